//! Client authentication and quotas with a real server, the real curl and openssl as clients,
//! on loopback: API keys (Bearer and Basic) made by `tsa client new-key`, wrong keys refused
//! even where anonymous access is allowed, anonymous access refused where it is not, keys
//! reloaded on SIGHUP; the HTTPS listener with the development certificate, mutual TLS mapped by
//! fingerprint and by subject, certificates of an unknown CA and missing required ones refused
//! in the handshake; 429 with Retry-After past a client's quota and service again after it; the
//! client's name in the archive; tokens from the HTTPS listener verified by `openssl ts -verify`;
//! the built-in client `tsa request` with a key file or `TSA_API_KEY`, over HTTPS and with a
//! client certificate, single and batch, and its refusal to send a key in clear to another host;
//! the HTTPS certificate renewed by SIGHUP (and a broken one refused).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{new_key, ok, openssl, run, wait_until, Server, TSA};
use tsa::client::read::Response;
use tsa::protocol::FailInfo;

const QUERY_TYPE: &str = "application/timestamp-query";
const REPLY_TYPE: &str = "application/timestamp-reply";

/// One HTTP exchange as curl saw it.
#[derive(Debug)]
struct Http {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Http {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    fn response(&self) -> Response {
        Response::from_der(&self.body)
            .unwrap_or_else(|e| panic!("not a TimeStampResp ({e}); status {}", self.status))
    }

    /// The token's DER of a 200 with a granted response.
    fn granted(&self) -> Vec<u8> {
        assert_eq!(self.status, 200, "{self:?}");
        assert_eq!(self.header("content-type").as_deref(), Some(REPLY_TYPE));
        let response = self.response();
        assert!(response.granted(), "{:?}", response.status_text);
        response.token.expect("a token").der
    }

    /// Checks an HTTP-level refusal: status, DER rejection with its failInfo and text.
    fn refused(&self, status: u16, fail_info: FailInfo, text: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.header("content-type").as_deref(), Some(REPLY_TYPE));
        let response = self.response();
        assert_eq!(response.status, 2, "rejection");
        assert_eq!(response.fail_info(), Some(fail_info));
        assert_eq!(response.status_text, vec![text.to_string()]);
    }
}

/// POSTs the query file `query` to `url` with curl and `extra` options; Err with curl's exit
/// code and message when no HTTP response came (a refused TLS handshake).
fn curl(url: &str, query: &Path, extra: &[&str]) -> Result<Http, String> {
    curl_as(url, query, QUERY_TYPE, extra)
}

/// [`curl`] with the body's content type.
fn curl_as(url: &str, query: &Path, content_type: &str, extra: &[&str]) -> Result<Http, String> {
    let work = tempfile::tempdir().unwrap();
    let (headers, body) = (work.path().join("headers"), work.path().join("body"));
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-H"])
        .arg(format!("Content-Type: {content_type}"))
        .arg("--data-binary")
        .arg(format!("@{}", query.display()))
        .arg("-D")
        .arg(&headers)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    if !out.status.success() {
        return Err(format!(
            "curl exit {:?}, http_code {}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Http {
        status: String::from_utf8(out.stdout).unwrap().parse().unwrap(),
        headers: std::fs::read_to_string(headers).unwrap(),
        body: std::fs::read(body).unwrap_or_default(),
    })
}

fn post(url: &str, query: &Path, extra: &[&str]) -> Http {
    curl(url, query, extra).unwrap_or_else(|e| panic!("{e}"))
}

/// `tsa init` in a fresh directory, with `--archive` and `args`.
fn init(args: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ok(Command::new(TSA)
        .arg("init")
        .arg("--dir")
        .arg(dir.path())
        .arg("--archive")
        .args(args));
    dir
}

/// Edits `tsa.toml`: each (from, to) replaced once, then `append` at the end.
fn configure(dir: &Path, replace: &[(&str, &str)], append: &str) {
    let path = dir.join("tsa.toml");
    let mut config = std::fs::read_to_string(&path).unwrap();
    for (from, to) in replace {
        assert!(config.contains(from), "{from:?} not in the configuration");
        config = config.replacen(from, to, 1);
    }
    config.push('\n');
    config.push_str(append);
    std::fs::write(path, config).unwrap();
}

/// A query for `data` made by `openssl ts -query`.
fn query(dir: &Path, name: &str) -> PathBuf {
    std::fs::write(dir.join(format!("{name}.txt")), name).unwrap();
    openssl(
        &[
            "ts",
            "-query",
            "-data",
            &format!("{name}.txt"),
            "-sha256",
            "-cert",
            "-out",
            &format!("{name}.tsq"),
        ],
        dir,
    );
    dir.join(format!("{name}.tsq"))
}

/// Every archived token (hex DER) with its client's name.
fn archived_clients(dir: &Path) -> HashMap<String, Option<String>> {
    let file = dir.join("export.jsonl");
    let _ = std::fs::remove_file(&file);
    ok(Command::new(TSA)
        .arg("archive")
        .arg("--config")
        .arg(dir.join("tsa.toml"))
        .args(["export", "--from", "0", "--to", "4000000000", "--jsonl"])
        .arg(&file)
        .env("RUST_LOG", "error"));
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let client = v["client"].as_str().map(str::to_string);
            (v["token"].as_str().unwrap().to_string(), client)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts which client the archive recorded for each token.
fn assert_archived(dir: &Path, expected: &[(&[u8], Option<&str>)]) {
    let archived = archived_clients(dir);
    assert_eq!(archived.len(), expected.len(), "{archived:?}");
    for (token, client) in expected {
        assert_eq!(
            archived.get(&hex(token)).map(Option::as_deref),
            Some(*client),
            "the archived client of a token"
        );
    }
}

/// The value of one series of the admin listener's metrics.
fn metric(server: &Server, series: &str) -> Option<f64> {
    let out = ok(Command::new("curl").args(["-sS", &format!("{}/metrics", server.admin_url)]));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
}

fn basic(user: &str, key: &str) -> String {
    format!("{user}:{key}")
}

/// Bearer and Basic keys name their client (recorded in the archive); a wrong key, another
/// client's name with a key, or an unknown scheme are 401 although anonymous access is on;
/// anonymous requests are served and archived without a name.
#[test]
fn api_keys_authenticate_and_wrong_ones_are_refused_even_with_anonymous_access() {
    let dir = init(&[]);
    let d = dir.path();
    let (alice, alice_toml) = new_key("alice", &[]);
    let bob_file = d.join("bob.key");
    let out = ok(Command::new(TSA).args([
        "client",
        "new-key",
        "--name",
        "bob",
        "--key-out",
        bob_file.to_str().unwrap(),
    ]));
    let bob = std::fs::read_to_string(&bob_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(bob.starts_with("tsa_") && bob != alice);
    let bob_toml = String::from_utf8(out.stdout).unwrap();
    // Another key into bob's file: refused, bob's key kept.
    let again = run(Command::new(TSA).args([
        "client",
        "new-key",
        "--name",
        "carol",
        "--key-out",
        bob_file.to_str().unwrap(),
    ]));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && stderr.contains("exists already"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&bob_file).unwrap().trim(), bob);
    configure(d, &[], &format!("{alice_toml}\n{bob_toml}"));
    let server = Server::serve(dir);
    let d = server.dir.path();
    let q = query(d, "keys");
    let url = &server.url;

    let anonymous = post(url, &q, &[]).granted();
    let bearer = post(url, &q, &["-H", &format!("Authorization: Bearer {alice}")]).granted();
    let basic_empty_user = post(url, &q, &["-u", &basic("", &alice)]).granted();
    let basic_named = post(url, &q, &["-u", &basic("bob", &bob)]).granted();

    let wrong_key = post(url, &q, &["-H", "Authorization: Bearer tsa_not-a-key"]);
    wrong_key.refused(401, FailInfo::BadRequest, "invalid credentials");
    assert!(wrong_key
        .header("www-authenticate")
        .is_some_and(|c| c.starts_with(r#"Bearer realm="tsa""#)));
    post(url, &q, &["-u", &basic("bob", &alice)]).refused(
        401,
        FailInfo::BadRequest,
        "invalid credentials",
    );
    post(url, &q, &["-H", &format!("Authorization: Token {alice}")]).refused(
        401,
        FailInfo::BadRequest,
        "invalid credentials",
    );
    // Two Authorization headers, each good alone: who the client is must not depend on
    // which one a reader takes (a proxy in front may take the other).
    let (alice_header, bob_header) = (
        format!("Authorization: Bearer {alice}"),
        format!("Authorization: Bearer {bob}"),
    );
    post(url, &q, &["-H", &alice_header, "-H", &bob_header]).refused(
        401,
        FailInfo::BadRequest,
        "invalid credentials",
    );
    assert_eq!(
        metric(
            &server,
            r#"tsa_auth_refusals_total{reason="invalid_credentials"}"#
        ),
        Some(4.0)
    );

    assert_archived(
        d,
        &[
            (&anonymous, None),
            (&bearer, Some("alice")),
            (&basic_empty_user, Some("alice")),
            (&basic_named, Some("bob")),
        ],
    );

    // `tsa request` sends a key in clear to `localhost` once the name resolved to loopback
    // addresses alone (as here); the token is then alice's.
    std::fs::write(d.join("alice.key"), &alice).unwrap();
    let url = server.url.replace("127.0.0.1", "localhost");
    let out = tsa_request(
        d,
        &[
            "--url",
            &url,
            "--api-key-file",
            "alice.key",
            "--data",
            "alice.key",
            "--out",
            "localhost.tsr",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        archived_clients(d)
            .values()
            .filter(|c| c.as_deref() == Some("alice"))
            .count(),
        3
    );
}

/// With `anonymous = false` a request without credentials is 401 with the Bearer challenge;
/// the certificate chain stays public; a key added to the configuration works after SIGHUP
/// and a removed one no longer does.
#[test]
fn without_anonymous_access_credentials_are_required_and_keys_reload() {
    let dir = init(&[]);
    let (alice, alice_toml) = new_key("alice", &[]);
    configure(
        dir.path(),
        &[],
        &format!("[auth]\nanonymous = false\n\n{alice_toml}"),
    );
    let server = Server::serve(dir);
    let d = server.dir.path();
    let q = query(d, "closed");

    let none = post(&server.url, &q, &[]);
    none.refused(401, FailInfo::BadRequest, "authentication required");
    assert_eq!(
        none.header("www-authenticate").as_deref(),
        Some(r#"Bearer realm="tsa""#)
    );
    // Basic is offered as well, in a challenge of its own.
    assert!(
        none.headers.lines().any(|l| l
            .trim_end()
            .eq_ignore_ascii_case(r#"www-authenticate: Basic realm="tsa", charset="UTF-8""#)),
        "{}",
        none.headers
    );
    let certs = ok(Command::new("curl").args(["-sS", "-f", &format!("{}certs", server.url)]));
    assert!(String::from_utf8_lossy(&certs.stdout).contains("BEGIN CERTIFICATE"));
    let token = post(&server.url, &q, &["-u", &basic("alice", &alice)]).granted();
    assert_eq!(
        metric(
            &server,
            r#"tsa_auth_refusals_total{reason="unauthenticated"}"#
        ),
        Some(1.0)
    );

    // A batch of alice's whose body is still coming during the reload.
    use std::io::{Read, Write};
    let batch = std::fs::read(batch_file(d, "alice-batch", 2)).unwrap();
    let url = server.url.strip_prefix("http://").unwrap();
    let (host, path) = url.split_once('/').unwrap();
    // Alice's request of `content_type` whose body has come only up to its tenth octet.
    let pending_request = |content_type: &str, body: &[u8]| {
        let mut pending = std::net::TcpStream::connect(host).unwrap();
        pending
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            pending,
            "POST /{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {alice}\r\n\
             Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        pending.write_all(&body[..10]).unwrap();
        pending
    };
    let mut pending = pending_request("application/timestamp-query-batch", &batch);
    // And a single request of hers, its body pending too.
    let single = std::fs::read(&q).unwrap();
    let mut pending_single = pending_request("application/timestamp-query", &single);
    // The server has taken the batch (authenticated, its place held) before the reload.
    wait_until(
        || metric(&server, "tsa_batches_in_flight") == Some(1.0),
        "alice's batch in flight",
    );
    let invalid = || {
        metric(
            &server,
            r#"tsa_auth_refusals_total{reason="invalid_credentials"}"#,
        )
        .unwrap_or(0.0)
    };

    // Replace alice by carol and reload.
    let (carol, carol_toml) = new_key("carol", &[]);
    let config = std::fs::read_to_string(d.join("tsa.toml")).unwrap();
    let at = config.find("[[auth.client]]").unwrap();
    std::fs::write(d.join("tsa.toml"), format!("{}{carol_toml}", &config[..at])).unwrap();
    server.signal("HUP");
    let carol_header = format!("Authorization: Bearer {carol}");
    wait_until(
        || post(&server.url, &q, &["-H", &carol_header]).status == 200,
        "carol's key after the reload",
    );
    let invalid_before = invalid();
    post(&server.url, &q, &["-u", &basic("alice", &alice)]).refused(
        401,
        FailInfo::BadRequest,
        "invalid credentials",
    );
    // The rest of alice's batch, after the reload that removed her: refused, not served.
    pending.write_all(&batch[10..]).unwrap();
    let mut reply = [0u8; 64];
    let n = pending.read(&mut reply).expect("an answer");
    let head = String::from_utf8_lossy(&reply[..n]);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    pending_single.write_all(&single[10..]).unwrap();
    let n = pending_single.read(&mut reply).expect("an answer");
    let head = String::from_utf8_lossy(&reply[..n]);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    // Three refusals since the reload: alice's new request, her batch and her pending one.
    assert_eq!(invalid(), invalid_before + 3.0);
    let archived = archived_clients(d);
    assert_eq!(archived[&hex(&token)].as_deref(), Some("alice"));
    assert!(archived.values().any(|c| c.as_deref() == Some("carol")));
    assert_eq!(archived.values().filter(|c| c.is_none()).count(), 0);
}

/// A client certificate made by the real openssl: `subject` (openssl's -subj form), issued by
/// `ca` (cert and key files in `dir`) or self-signed when `ca` is None.
fn client_cert(dir: &Path, name: &str, subject: &str, ca: Option<(&str, &str)>) {
    let extensions =
        "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = clientAuth\n";
    openssl_cert(dir, name, subject, ca, extensions);
}

/// A P-256 key `{name}-key.pem` and its certificate `{name}-cert.pem` made by the real
/// openssl: `subject` (openssl's -subj form) with `extensions` (an extfile's lines), issued by
/// `ca` (cert and key files in `dir`) or self-signed (with clientAuth) when `ca` is None.
fn openssl_cert(dir: &Path, name: &str, subject: &str, ca: Option<(&str, &str)>, extensions: &str) {
    let ext = format!("{name}-ext.cnf");
    std::fs::write(dir.join(&ext), extensions).unwrap();
    let (key, cert) = (format!("{name}-key.pem"), format!("{name}-cert.pem"));
    match ca {
        Some((ca_cert, ca_key)) => {
            let csr = format!("{name}.csr");
            openssl(
                &[
                    "req",
                    "-new",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &key,
                    "-subj",
                    subject,
                    "-out",
                    &csr,
                ],
                dir,
            );
            openssl(
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    ca_cert,
                    "-CAkey",
                    ca_key,
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                    "-out",
                    &cert,
                ],
                dir,
            );
        }
        None => {
            openssl(
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &key,
                    "-subj",
                    subject,
                    "-days",
                    "2",
                    "-addext",
                    "extendedKeyUsage = clientAuth",
                    "-out",
                    &cert,
                ],
                dir,
            );
        }
    }
}

/// `openssl ts -verify` of a reply against the query and the TSA's CA.
fn openssl_verify(dir: &Path, reply: &[u8], query: &Path) {
    std::fs::write(dir.join("verify.tsr"), reply).unwrap();
    let out = openssl(
        &[
            "ts",
            "-verify",
            "-in",
            "verify.tsr",
            "-queryfile",
            query.to_str().unwrap(),
            "-CAfile",
            "ca-cert.pem",
        ],
        dir,
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Verification: OK"));
}

/// The HTTPS listener of `tsa init --tls`: anonymous HTTPS with the development CA; mutual TLS
/// by fingerprint (the development client) and by subject and issuer (a certificate the real
/// openssl issued from the client CA, its subject and issuer as openssl prints them); a
/// verified certificate of no configured client is 401, and so is one with a configured
/// subject from a second trusted client CA; a key and a certificate of different clients are
/// 401; a certificate of an unknown CA (even with a configured subject) is refused in the
/// handshake.
/// The tokens verify with `openssl ts -verify`, and the archive names their clients.
#[test]
fn https_and_mutual_tls_map_certificates_to_clients() {
    let dir = init(&["--tls", "--https-listen", "127.0.0.1:0"]);
    let d = dir.path();
    client_cert(
        d,
        "carol",
        "/C=VN/O=Example/CN=carol",
        Some(("client-ca-cert.pem", "client-ca-key.pem")),
    );
    client_cert(
        d,
        "stranger",
        "/CN=stranger",
        Some(("client-ca-cert.pem", "client-ca-key.pem")),
    );
    client_cert(d, "rogue", "/C=VN/O=Example/CN=carol", None);
    // A second client CA, trusted too, that issues a certificate with carol's subject.
    openssl_cert(
        d,
        "other-ca",
        "/CN=Other Client CA",
        None,
        "basicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n",
    );
    client_cert(
        d,
        "impostor",
        "/C=VN/O=Example/CN=carol",
        Some(("other-ca-cert.pem", "other-ca-key.pem")),
    );
    let issuer = String::from_utf8(
        openssl(
            &[
                "x509",
                "-in",
                "carol-cert.pem",
                "-noout",
                "-issuer",
                "-nameopt",
                "RFC2253",
            ],
            d,
        )
        .stdout,
    )
    .unwrap();
    let issuer = issuer.trim().strip_prefix("issuer=").unwrap().to_string();
    let subject = String::from_utf8(
        openssl(
            &[
                "x509",
                "-in",
                "carol-cert.pem",
                "-noout",
                "-subject",
                "-nameopt",
                "RFC2253",
            ],
            d,
        )
        .stdout,
    )
    .unwrap();
    let subject = subject.trim().strip_prefix("subject=").unwrap().to_string();
    assert_eq!(subject, "CN=carol,O=Example,C=VN");
    let (alice, alice_toml) = new_key("alice", &[]);
    configure(
        d,
        &[(
            r#"client_ca = ["client-ca-cert.pem"]"#,
            r#"client_ca = ["client-ca-cert.pem", "other-ca-cert.pem"]"#,
        )],
        &format!(
            "[[auth.client]]\nname = \"carol\"\ncertificate_subject = \"{subject}\"\n\
             certificate_issuer = \"{issuer}\"\n\n{alice_toml}"
        ),
    );
    let server = Server::serve(dir);
    let d = server.dir.path();
    let https = server.https_url.clone().expect("an HTTPS listener");
    assert!(https.starts_with("https://127.0.0.1:"), "{https}");
    let q = query(d, "tls");
    let cacert = ["--cacert", "ca-cert.pem"];
    let with = |cert: &str| -> Vec<String> {
        [
            "--cacert",
            "ca-cert.pem",
            "--cert",
            &format!("{cert}-cert.pem"),
            "--key",
            &format!("{cert}-key.pem"),
        ]
        .map(String::from)
        .to_vec()
    };
    let in_dir = |args: Vec<String>| -> Vec<String> {
        args.into_iter()
            .map(|a| match a.ends_with(".pem") {
                true => d.join(a).display().to_string(),
                false => a,
            })
            .collect()
    };
    let post_tls = |args: Vec<String>| {
        let args = in_dir(args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&https, &q, &args)
    };

    // Without a client certificate: anonymous, or a key, over HTTPS.
    let anonymous = post_tls(cacert.map(String::from).to_vec()).unwrap();
    openssl_verify(d, &anonymous.body, &q);
    let anonymous = anonymous.granted();
    let mut keyed = cacert.map(String::from).to_vec();
    keyed.extend(["-H".into(), format!("Authorization: Bearer {alice}")]);
    let by_key = post_tls(keyed).unwrap().granted();
    // The server is who the development CA says it is: without it curl refuses.
    assert!(curl(&https, &q, &[]).is_err());

    // Mutual TLS.
    let dev = post_tls(with("client")).unwrap();
    openssl_verify(d, &dev.body, &q);
    let dev = dev.granted();
    let carol = post_tls(with("carol")).unwrap().granted();
    post_tls(with("stranger"))
        .unwrap()
        .refused(401, FailInfo::BadRequest, "invalid credentials");
    let mut mixed = with("carol");
    mixed.extend(["-H".into(), format!("Authorization: Bearer {alice}")]);
    post_tls(mixed)
        .unwrap()
        .refused(401, FailInfo::BadRequest, "invalid credentials");
    // Carol's subject from the other trusted CA: verified in the handshake, but not carol.
    post_tls(with("impostor"))
        .unwrap()
        .refused(401, FailInfo::BadRequest, "invalid credentials");
    let rogue = post_tls(with("rogue"));
    assert!(
        rogue.is_err(),
        "a certificate of an unknown CA is refused in the handshake: {rogue:?}"
    );
    // The listener still serves after the refused handshake.
    let again = post_tls(with("client")).unwrap().granted();

    assert_archived(
        d,
        &[
            (&anonymous, None),
            (&by_key, Some("alice")),
            (&dev, Some("dev-client")),
            (&carol, Some("carol")),
            (&again, Some("dev-client")),
        ],
    );
}

/// A client CA made with rcgen: its certificate (PEM) in `dir`, and what signs for it.
struct TestCa {
    key: rcgen::KeyPair,
    params: rcgen::CertificateParams,
}

impl TestCa {
    fn new(dir: &Path, name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        TestCa { key, params }
    }

    /// A client certificate with `serial`: `{name}-cert.pem` and `{name}-key.pem` in `dir`.
    fn issue(&self, dir: &Path, name: &str, serial: u64) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.serial_number = Some(serial.into());
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let issuer = rcgen::Issuer::new(self.params.clone(), &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}-cert.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }

    /// A CRL numbered `number` that revokes `serials`.
    fn crl(&self, number: u64, serials: &[u64]) -> rcgen::CertificateRevocationList {
        let issuer = rcgen::Issuer::new(self.params.clone(), &self.key);
        rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: number.into(),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&serial| rcgen::RevokedCertParams {
                    serial_number: serial.into(),
                    revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .unwrap()
    }
}

/// Two client CAs of one name and different keys are one issuer to a client configured by
/// certificate_issuer and certificate_subject (which names the CA by its name): the start
/// says so, where the operator can give each its own name.
#[test]
fn client_cas_that_share_a_name_are_named_at_start() {
    let dir = init(&["--tls", "--https-listen", "127.0.0.1:0"]);
    let d = dir.path();
    for copy in ["twin-a.pem", "twin-b.pem"] {
        let _ = TestCa::new(d, "Twin CA");
        std::fs::rename(d.join("Twin CA.pem"), d.join(copy)).unwrap();
    }
    configure(
        d,
        &[(
            r#"client_ca = ["client-ca-cert.pem"]"#,
            r#"client_ca = ["client-ca-cert.pem", "twin-a.pem"]"#,
        )],
        "",
    );
    let warning = "two client CAs have this name and different keys";
    let log = |server: &Server| std::fs::read_to_string(server.path(Server::LOG)).unwrap();
    let server = Server::serve_logged(dir);
    assert!(!log(&server).contains(warning), "{}", log(&server));
    let dir = server.into_dir();
    let d = dir.path();
    configure(
        d,
        &[(r#""twin-a.pem"]"#, r#""twin-a.pem", "twin-b.pem"]"#)],
        "",
    );
    let server = Server::serve_logged(dir);
    assert!(
        log(&server).contains(warning) && log(&server).contains("CN=Twin CA"),
        "{}",
        log(&server)
    );
}

/// `server.tls.client_crl`: with the client CA's CRL (PEM) that revokes nothing, both of its
/// clients are served; after a CRL (DER) that revokes one and a reload (SIGHUP), that one is
/// refused in the handshake while the other still gets its token. A certificate of a client CA
/// that has no CRL listed is refused (its status is unknown).
#[test]
fn client_certificates_revoked_by_a_crl_are_refused_in_the_handshake() {
    let dir = init(&["--tls", "--https-listen", "127.0.0.1:0"]);
    let d = dir.path();
    let ca = TestCa::new(d, "crl-ca");
    ca.issue(d, "kept", 1001);
    ca.issue(d, "revoked", 1002);
    std::fs::write(d.join("crl.pem"), ca.crl(1, &[]).pem().unwrap()).unwrap();
    let mut clients = String::new();
    for name in ["kept", "revoked"] {
        let cert = d.join(format!("{name}-cert.pem"));
        let out = ok(Command::new(TSA)
            .args(["client", "cert-id", "--name", name, "--cert"])
            .arg(&cert));
        clients.push_str(&String::from_utf8(out.stdout).unwrap());
        clients.push('\n');
    }
    configure(
        d,
        &[(
            r#"client_ca = ["client-ca-cert.pem"]"#,
            r#"client_ca = ["client-ca-cert.pem", "crl-ca.pem"]
client_crl = ["crl.pem"]"#,
        )],
        &clients,
    );
    let server = Server::serve(dir);
    let d = server.dir.path();
    let https = server.https_url.clone().expect("an HTTPS listener");
    // The listener's certificate and CRLs, for an operator's alerts.
    let metrics = ok(Command::new("curl").args(["-sS", &format!("{}/metrics", server.admin_url)]));
    let metrics = String::from_utf8(metrics.stdout).unwrap();
    let gauge = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name}: {metrics}"))
    };
    let next_update = chrono::DateTime::parse_from_rfc3339("2099-01-01T00:00:00Z").unwrap();
    let crl_left = (next_update.timestamp() - chrono::Utc::now().timestamp()) as f64;
    assert!((gauge("tsa_tls_client_crl_next_update_seconds") - crl_left).abs() < 120.0);
    assert!(gauge("tsa_tls_certificate_expiry_seconds") > 86_400.0);
    let q = query(d, "crl");
    let post_as = |name: &str| {
        let file = |f: String| d.join(f).display().to_string();
        curl(
            &https,
            &q,
            &[
                "--cacert",
                &file("ca-cert.pem".into()),
                "--cert",
                &file(format!("{name}-cert.pem")),
                "--key",
                &file(format!("{name}-key.pem")),
            ],
        )
    };
    post_as("kept").unwrap().granted();
    post_as("revoked").unwrap().granted();
    // The development client's CA has no CRL here: its status is unknown, so it is refused.
    assert!(
        post_as("client").is_err(),
        "a certificate of a CA without a CRL"
    );
    // Connections kept open across the reload (keep-alive), one for each certificate.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let kept_open = |name: &str| {
        let endpoint = tsa::client::transport::Endpoint::new(
            &https,
            &tsa::client::transport::Options {
                ca_certs: Some(d.join("ca-cert.pem")),
                client_cert: Some((
                    d.join(format!("{name}-cert.pem")),
                    d.join(format!("{name}-key.pem")),
                )),
                ..Default::default()
            },
        )
        .unwrap();
        endpoint
    };
    let query_der = std::fs::read(&q).unwrap();
    let stamp_on = |endpoint: &tsa::client::transport::Endpoint| {
        runtime
            .block_on(tsa::client::post(endpoint, query_der.clone()))
            .map(|body| Response::from_der(&body).unwrap())
            .map_err(|e| format!("{e:#}"))
    };
    let (kept_conn, revoked_conn) = (kept_open("kept"), kept_open("revoked"));
    assert!(stamp_on(&kept_conn).unwrap().granted());
    assert!(stamp_on(&revoked_conn).unwrap().granted());

    std::fs::write(d.join("crl.pem"), ca.crl(2, &[1002]).der()).unwrap();
    server.signal("HUP");
    wait_until(
        || post_as("revoked").is_err(),
        "the revoked certificate to be refused after the reload",
    );
    post_as("kept").unwrap().granted();
    // On the connections opened before the reload: the revoked certificate is refused at its
    // next request, the kept one verified again and served.
    let refused =
        stamp_on(&revoked_conn).expect_err("a revoked certificate served on its old connection");
    assert!(refused.contains("HTTP 401"), "{refused}");
    // That answer closed the connection: the next request makes a new one, whose handshake
    // the CRL refuses (on the old one each request searched the chain's paths again).
    let again = stamp_on(&revoked_conn).expect_err("a revoked certificate served");
    assert!(
        !again.contains("HTTP 401"),
        "the refused connection kept open: {again}"
    );
    assert!(stamp_on(&kept_conn).unwrap().granted());
    let archived = archived_clients(d);
    let count = |name| {
        archived
            .values()
            .filter(|c| c.as_deref() == Some(name))
            .count()
    };
    assert_eq!((count("kept"), count("revoked")), (4, 2), "{archived:?}");
}

/// `require_client_certificate = true`: a handshake without a client certificate is refused;
/// with the development client's certificate the request is served as that client.
#[test]
fn a_required_client_certificate_is_enforced_in_the_handshake() {
    let dir = init(&["--tls", "--https-listen", "127.0.0.1:0"]);
    configure(
        dir.path(),
        &[(
            "require_client_certificate = false",
            "require_client_certificate = true",
        )],
        "",
    );
    let server = Server::serve(dir);
    let d = server.dir.path();
    let https = server.https_url.clone().expect("an HTTPS listener");
    let q = query(d, "required");
    let file = |name: &str| d.join(name).display().to_string();
    let without = curl(&https, &q, &["--cacert", &file("ca-cert.pem")]);
    assert!(without.is_err(), "no certificate, no TLS: {without:?}");
    let with = post(
        &https,
        &q,
        &[
            "--cacert",
            &file("ca-cert.pem"),
            "--cert",
            &file("client-cert.pem"),
            "--key",
            &file("client-key.pem"),
        ],
    );
    let token = with.granted();
    assert_archived(d, &[(&token, Some("dev-client"))]);
}

/// Several requests on one keep-alive connection (one curl, the URL repeated): each one's
/// HTTP status, Retry-After and body.
fn burst(url: &str, query: &Path, n: usize, extra: &[&str]) -> Vec<(u16, String, Vec<u8>)> {
    let work = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-H"])
        .arg(format!("Content-Type: {QUERY_TYPE}"))
        .arg("--data-binary")
        .arg(format!("@{}", query.display()))
        .args(["-w", "%{http_code} %header{retry-after}\n"])
        .args(extra);
    for i in 0..n {
        cmd.arg("-o").arg(work.path().join(i.to_string())).arg(url);
    }
    let out = ok(&mut cmd);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let (code, retry) = l.split_once(' ').unwrap_or((l, ""));
            let body = std::fs::read(work.path().join(i.to_string())).unwrap();
            (code.parse().unwrap(), retry.trim().to_string(), body)
        })
        .collect()
}

/// A client with 5 tokens/s and a burst of 5: its burst is served, then 429 with Retry-After
/// and a DER systemFailure; after waiting it is served again. Other clients are not affected;
/// the anonymous callers share their own bucket.
#[test]
fn quotas_answer_429_with_retry_after_and_recover() {
    let dir = init(&[]);
    let (alice, alice_toml) = new_key("alice", &["--rate-per-s", "5", "--burst", "5"]);
    let (bob, bob_toml) = new_key("bob", &[]);
    configure(
        dir.path(),
        &[],
        &format!(
            "[auth]\nanonymous_rate_per_s = 2\nanonymous_burst = 2\n\n{alice_toml}\n{bob_toml}"
        ),
    );
    let server = Server::serve(dir);
    let d = server.dir.path();
    let q = query(d, "quota");
    let alice_auth = format!("Authorization: Bearer {alice}");

    let started = Instant::now();
    let statuses = burst(&server.url, &q, 10, &["-H", &alice_auth]);
    let elapsed = started.elapsed();
    assert_eq!(statuses.len(), 10);
    let codes: Vec<u16> = statuses.iter().map(|(code, _, _)| *code).collect();
    assert_eq!(codes[..5], [200; 5], "the burst: {codes:?}");
    let granted = codes.iter().filter(|c| **c == 200).count();
    let refused: Vec<_> = statuses
        .iter()
        .filter(|(code, _, _)| *code == 429)
        .collect();
    assert_eq!(granted + refused.len(), 10, "{codes:?}");
    // 5 at once, then at most 5 per second (and one for a partly refilled token).
    let allowed = 5 + (elapsed.as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        !refused.is_empty() && granted <= allowed,
        "{codes:?} in {elapsed:?}"
    );
    for (_, retry_after, body) in &refused {
        assert_eq!(retry_after, "1", "{codes:?}");
        let response = Response::from_der(body).unwrap();
        assert_eq!(response.fail_info(), Some(FailInfo::SystemFailure));
        assert_eq!(response.status_text, ["request quota exceeded"]);
    }
    assert_eq!(
        metric(&server, r#"tsa_auth_refusals_total{reason="quota"}"#),
        Some(refused.len() as f64)
    );

    // Bob has no limit, whatever alice does.
    let bob_auth = format!("Authorization: Bearer {bob}");
    assert!(burst(&server.url, &q, 12, &["-H", &bob_auth])
        .iter()
        .all(|(code, _, _)| *code == 200));
    // The anonymous callers: 2 at once between them.
    let anonymous: Vec<u16> = burst(&server.url, &q, 4, &[])
        .iter()
        .map(|(code, _, _)| *code)
        .collect();
    assert_eq!(anonymous[..2], [200, 200]);
    assert!(anonymous[2..].contains(&429), "{anonymous:?}");

    // After Retry-After, alice is served again.
    std::thread::sleep(Duration::from_millis(1_100));
    post(&server.url, &q, &["-H", &alice_auth]).granted();
}

/// With `auth_failures_per_address_*`, an address that made its failed authentications gets
/// 429 for any request with an `Authorization` header, a right key's too (which is not looked
/// at: an online guesser learns nothing), until it may fail once more; requests without one
/// are not held.
#[test]
fn an_address_past_its_failed_authentications_is_refused_before_its_key_is_looked_at() {
    let dir = init(&[]);
    let (alice, alice_toml) = new_key("alice", &[]);
    configure(
        dir.path(),
        &[(
            "[server]\n",
            // Two workers: the burst is at least the keys looked at together plus one.
            "[server]\nworkers = 2\nauth_failures_per_address_per_s = 0.5\n\
             auth_failures_per_address_burst = 3\n",
        )],
        &alice_toml,
    );
    let server = Server::serve(dir);
    let d = server.dir.path();
    let q = query(d, "failures");
    let wrong = format!("Authorization: Bearer {}", "A".repeat(alice.len()));
    let right = format!("Authorization: Bearer {alice}");
    // Right keys spend none of the address's failures (each takes one and gives it back).
    for _ in 0..5 {
        post(&server.url, &q, &["-H", &right]).granted();
    }
    for n in 0..3 {
        let reply = post(&server.url, &q, &["-H", &wrong]);
        assert_eq!(reply.status, 401, "failure {n}: {reply:?}");
    }
    for auth in [&wrong, &right] {
        let reply = post(&server.url, &q, &["-H", auth]);
        reply.refused(
            429,
            FailInfo::SystemFailure,
            "too many failed authentications from this address",
        );
        let wait: u64 = reply.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=2).contains(&wait), "{reply:?}");
    }
    // Without credentials (anonymous access is on), nothing to guess.
    post(&server.url, &q, &[]).granted();
    assert_eq!(
        metric(
            &server,
            r#"tsa_auth_refusals_total{reason="address_failures"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &server,
            r#"tsa_auth_refusals_total{reason="invalid_credentials"}"#
        ),
        Some(3.0)
    );
    // Once the address may fail again, its right key is taken.
    std::thread::sleep(Duration::from_millis(2_100));
    post(&server.url, &q, &["-H", &right]).granted();
}

/// A request of another media type (415) costs no token: anonymous callers share one bucket,
/// which 415s would otherwise empty for nothing.
#[test]
fn a_request_of_another_media_type_costs_no_token() {
    let dir = init(&[]);
    configure(
        dir.path(),
        &[],
        "[auth]\nanonymous_rate_per_s = 0.001\nanonymous_burst = 2\n",
    );
    let server = Server::serve(dir);
    let q = query(server.dir.path(), "media-type");
    for _ in 0..3 {
        let out = ok(Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg("Content-Type: text/plain")
            .arg("--data-binary")
            .arg(format!("@{}", q.display()))
            .arg(&server.url));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "415");
    }
    let codes: Vec<u16> = burst(&server.url, &q, 3, &[])
        .iter()
        .map(|(code, _, _)| *code)
        .collect();
    assert_eq!(codes, [200, 200, 429], "the two tokens left whole");
}

/// A client with no token left is refused a batch (429) before its body is read: it holds no
/// batch place while the body comes, however slowly (here it never comes).
#[test]
fn a_batch_of_a_client_over_its_quota_is_refused_before_its_body() {
    use std::io::{Read, Write};
    let dir = init(&[]);
    let (alice, alice_toml) = new_key("alice", &["--rate-per-s", "0.05", "--burst", "1"]);
    configure(dir.path(), &[], &format!("[auth]\n{alice_toml}"));
    let server = Server::serve(dir);
    let q = query(server.dir.path(), "batch-quota");
    let alice_auth = format!("Authorization: Bearer {alice}");
    assert_eq!(post(&server.url, &q, &["-H", &alice_auth]).status, 200);

    let url = server.url.strip_prefix("http://").unwrap();
    let (host, path) = url.split_once('/').unwrap();
    let mut conn = std::net::TcpStream::connect(host).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        conn,
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {alice}\r\n\
         Content-Type: application/timestamp-query-batch\r\nContent-Length: 100000\r\n\r\n"
    )
    .unwrap();
    // None of the body is ever sent: an answer at all came before it (a server that waited
    // for it would answer 408 at its read timeout).
    let mut reply = [0u8; 64];
    let n = conn.read(&mut reply).expect("an answer before the body");
    let head = String::from_utf8_lossy(&reply[..n]);
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
}

/// A batch costs one token before its body is read: one refused before its items are counted
/// (here not a batch at all, 400) keeps it, so that a client cannot hold batch places for
/// nothing. With a burst of 2 and nothing refilling, two malformed batches leave alice no
/// token: her third batch (before its body, its places let go at once) and a single request
/// are refused (429). Bob's malformed batch costs one of his 2; a batch of 2 then finds only one and is
/// refused when its items are counted, after its body held a place: it keeps the one too.
#[test]
fn a_batch_refused_before_its_items_are_counted_costs_one_token() {
    const BATCH: &str = "application/timestamp-query-batch";
    let dir = init(&[]);
    // One token every 1000 s.
    let quota = ["--rate-per-s", "0.001", "--burst", "2"];
    let (alice, alice_toml) = new_key("alice", &quota);
    let (bob, bob_toml) = new_key("bob", &quota);
    configure(
        dir.path(),
        &[],
        &format!("[auth]\n{alice_toml}\n{bob_toml}"),
    );
    let server = Server::serve(dir);
    let d = server.dir.path();
    // A lone TimeStampReq sent as a batch: not a SEQUENCE OF SEQUENCEs.
    let not_a_batch = query(d, "not-a-batch");
    let auth = |key: &str| format!("Authorization: Bearer {key}");
    let batch = |file: &Path, key: &str| {
        curl_as(&server.url, file, BATCH, &["-H", &auth(key)]).unwrap_or_else(|e| panic!("{e}"))
    };
    for _ in 0..2 {
        assert_eq!(batch(&not_a_batch, &alice).status, 400);
    }
    batch(&not_a_batch, &alice).refused(429, FailInfo::SystemFailure, "request quota exceeded");
    post(&server.url, &not_a_batch, &["-H", &auth(&alice)]).refused(
        429,
        FailInfo::SystemFailure,
        "request quota exceeded",
    );

    assert_eq!(batch(&not_a_batch, &bob).status, 400);
    batch(&batch_file(d, "bob", 2), &bob).refused(
        429,
        FailInfo::SystemFailure,
        "request quota exceeded",
    );
    post(&server.url, &not_a_batch, &["-H", &auth(&bob)]).refused(
        429,
        FailInfo::SystemFailure,
        "request quota exceeded",
    );
}

/// A batch of `n` distinct queries (`tag` and the item's number) as `name.tsqb` in `dir`.
fn batch_file(dir: &Path, name: &str, n: usize) -> PathBuf {
    let items: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            tsa::client::Query::for_data(
                tsa::alg::DigestAlgorithm::Sha256,
                format!("{name} item {i}").as_bytes(),
            )
            .unwrap()
            .to_der()
            .unwrap()
        })
        .collect();
    let path = dir.join(format!("{name}.tsqb"));
    std::fs::write(&path, tsa::protocol::batch::encode(&items)).unwrap();
    path
}

/// The answers of a batch, each granted; how many.
fn granted_batch(reply: &Http) -> usize {
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/timestamp-reply-batch")
    );
    let answers = tsa::protocol::batch::decode(&reply.body, usize::MAX).expect("a SEQUENCE OF");
    for answer in &answers {
        let response = Response::from_der(answer).unwrap();
        assert!(response.granted(), "{:?}", response.status_text);
    }
    answers.len()
}

/// A batch of n items takes n tokens from its client's bucket, and one larger than the burst
/// is taken from a full bucket only, leaving a debt (docs/batch.md): with a burst of 5 and a
/// rate so low that nothing refills during the test, a batch of 4 leaves one single request;
/// after a single request a batch of 10 is refused; from a full bucket a batch of 10 is served
/// and the next single request waits for the whole debt (Retry-After).
#[test]
fn a_batch_of_n_items_takes_n_tokens_of_its_clients_quota() {
    const BATCH: &str = "application/timestamp-query-batch";
    let dir = init(&[]);
    // One token every 1000 s.
    let quota = ["--rate-per-s", "0.001", "--burst", "5"];
    let (alice, alice_toml) = new_key("alice", &quota);
    let (bob, bob_toml) = new_key("bob", &quota);
    let (carol, carol_toml) = new_key("carol", &quota);
    configure(
        dir.path(),
        &[],
        &format!("[auth]\n{alice_toml}\n{bob_toml}\n{carol_toml}"),
    );
    let server = Server::serve(dir);
    let d = server.dir.path();
    let q = query(d, "single");
    let auth = |key: &str| format!("Authorization: Bearer {key}");
    let batch = |file: &Path, key: &str| {
        curl_as(&server.url, file, BATCH, &["-H", &auth(key)]).unwrap_or_else(|e| panic!("{e}"))
    };
    let retry_after = |reply: &Http| -> u64 {
        reply.refused(429, FailInfo::SystemFailure, "request quota exceeded");
        reply
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .unwrap()
    };

    // Alice: 4 of her 5 tokens in one batch, then one single request; the next is refused,
    // with a token's interval to wait.
    assert_eq!(granted_batch(&batch(&batch_file(d, "alice", 4), &alice)), 4);
    post(&server.url, &q, &["-H", &auth(&alice)]).granted();
    let wait = retry_after(&post(&server.url, &q, &["-H", &auth(&alice)]));
    assert!(wait <= 1000, "Retry-After: {wait}");

    // Bob: a single request; then 10, more than the burst, only from a full bucket.
    post(&server.url, &q, &["-H", &auth(&bob)]).granted();
    retry_after(&batch(&batch_file(d, "bob", 10), &bob));

    // Carol: 10 from a full bucket; the next request waits for the debt of all ten, less the
    // burst, plus its own token: 6 intervals, 6000 s (a batch charged as 5 would leave one
    // interval to wait; charged as 1, the request would be served).
    assert_eq!(
        granted_batch(&batch(&batch_file(d, "carol", 10), &carol)),
        10
    );
    let wait = retry_after(&post(&server.url, &q, &["-H", &auth(&carol)]));
    assert!((2000..=6000).contains(&wait), "Retry-After: {wait}");
}

/// A reload (SIGHUP) forgives no debt: a client whose rate and burst are unchanged keeps its
/// bucket, so after spending its burst it is still refused (429) once the reload is in force;
/// the anonymous callers' shared bucket likewise. A client whose quota changed starts with
/// what it had spent taken: carol, with her one token spent, has 2 of her new burst of 3.
#[test]
fn a_reload_keeps_the_quota_state_of_unchanged_clients() {
    let dir = init(&[]);
    let (alice, alice_toml) = new_key("alice", &["--rate-per-s", "0.05", "--burst", "2"]);
    let (carol, carol_toml) = new_key("carol", &["--rate-per-s", "0.05", "--burst", "1"]);
    configure(
        dir.path(),
        &[],
        &format!(
            "[auth]\nanonymous_rate_per_s = 0.05\nanonymous_burst = 1\n\n{alice_toml}\n{carol_toml}"
        ),
    );
    let server = Server::serve(dir);
    let d = server.dir.path();
    let q = query(d, "reload-quota");
    let alice_auth = format!("Authorization: Bearer {alice}");
    let carol_auth = format!("Authorization: Bearer {carol}");
    let codes = |extra: &[&str], n| -> Vec<u16> {
        burst(&server.url, &q, n, extra)
            .iter()
            .map(|(code, _, _)| *code)
            .collect()
    };
    assert_eq!(codes(&["-H", &alice_auth], 3), [200, 200, 429]);
    assert_eq!(codes(&["-H", &carol_auth], 2), [200, 429]);
    assert_eq!(codes(&[], 2), [200, 429]);

    // Add bob, give carol a larger burst, and reload; bob's key shows the reload in force.
    let (bob, bob_toml) = new_key("bob", &[]);
    let config = std::fs::read_to_string(d.join("tsa.toml")).unwrap();
    let config = config.replacen(
        "rate_per_s = 0.05\nburst = 1",
        "rate_per_s = 0.05\nburst = 3",
        1,
    );
    std::fs::write(d.join("tsa.toml"), format!("{config}\n{bob_toml}")).unwrap();
    server.signal("HUP");
    let bob_auth = format!("Authorization: Bearer {bob}");
    wait_until(
        || post(&server.url, &q, &["-H", &bob_auth]).status == 200,
        "bob's key after the reload",
    );
    assert_eq!(
        codes(&["-H", &alice_auth], 1),
        [429],
        "alice's spent burst survives the reload"
    );
    assert_eq!(codes(&[], 1), [429], "so does the anonymous bucket");
    assert_eq!(
        codes(&["-H", &carol_auth], 4),
        [200, 200, 429, 429],
        "a changed quota starts with what was spent"
    );
}

/// `tsa request` (single and batch) in `dir`, with `args`, and no API key from the test's own
/// environment unless `env` gives one.
fn tsa_request(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(TSA)
        .current_dir(dir)
        .arg("request")
        .args(args)
        .env_remove("TSA_API_KEY")
        .envs(env.iter().copied())
        .output()
        .expect("run tsa request")
}

/// The token of a granted reply that `tsa request` saved.
fn saved_token(path: &Path) -> Vec<u8> {
    let reply = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let response = Response::from_der(&reply).unwrap();
    assert!(response.granted(), "{:?}", response.status_text);
    response.token.expect("a token").der
}

fn assert_fails(out: &std::process::Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded: {stderr}");
    for text in expected {
        assert!(stderr.contains(text), "{text:?} not in {stderr:?}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The built-in client with credentials, against a server with anonymous access off and its
/// HTTPS listener: a key from `--api-key-file` (plain HTTP on loopback) and from `TSA_API_KEY`
/// (HTTPS) names alice in the archive; a wrong key and no key are the server's 401, reported
/// with its reason and nothing saved; `--cacert` of another CA fails the handshake; the
/// development client certificate (`--cert`/`--key`) is mapped to "dev-client"; a `--batch`
/// over HTTPS with the key is granted, verified and archived as alice's.
#[test]
fn tsa_request_sends_api_keys_and_speaks_https_with_client_certificates() {
    let dir = init(&["--tls", "--https-listen", "127.0.0.1:0"]);
    let (alice, alice_toml) = new_key("alice", &[]);
    configure(
        dir.path(),
        &[("anonymous = true", "anonymous = false")],
        &alice_toml,
    );
    let server = Server::serve(dir);
    let d = server.dir.path();
    let https = server.https_url.clone().expect("an HTTPS listener");
    std::fs::write(d.join("doc.txt"), "a document").unwrap();
    std::fs::write(d.join("alice.key"), format!("\n {alice}\n")).unwrap();
    std::fs::write(d.join("wrong.key"), "tsa_not-a-key\n").unwrap();
    let single = |url: &str, out: &str, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["--url", url, "--data", "doc.txt", "--out", out];
        args.extend(extra);
        tsa_request(d, &args, env)
    };

    // Plain HTTP on loopback with the key file.
    let out = single(
        &server.url,
        "keyed.tsr",
        &["--api-key-file", "alice.key"],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let keyed = saved_token(&d.join("keyed.tsr"));

    // A wrong key, and none: the server's 401 with its reason; no reply saved.
    let out = single(
        &server.url,
        "wrong.tsr",
        &["--api-key-file", "wrong.key"],
        &[],
    );
    assert_fails(
        &out,
        &[
            "refused the request: HTTP 401 Unauthorized (invalid credentials)",
            "check the API key",
        ],
    );
    let out = single(&server.url, "wrong.tsr", &[], &[]);
    assert_fails(
        &out,
        &[
            "HTTP 401 Unauthorized (authentication required)",
            "--api-key-file",
        ],
    );
    assert!(!d.join("wrong.tsr").exists());

    // HTTPS trusting the development CA, the key from the environment.
    let out = single(
        &https,
        "https.tsr",
        &["--cacert", "ca-cert.pem"],
        &[("TSA_API_KEY", &alice)],
    );
    assert!(out.status.success(), "{out:?}");
    let over_https = saved_token(&d.join("https.tsr"));
    // The server's certificate does not chain to another CA.
    let out = single(
        &https,
        "wrong.tsr",
        &[
            "--cacert",
            "client-ca-cert.pem",
            "--api-key-file",
            "alice.key",
        ],
        &[],
    );
    assert_fails(&out, &["the TLS handshake failed", "UnknownIssuer"]);
    // No --cacert: refused before connecting.
    let out = single(&https, "wrong.tsr", &["--api-key-file", "alice.key"], &[]);
    assert_fails(&out, &["https:// needs --cacert FILE"]);

    // Mutual TLS with the development client certificate, no key.
    let out = single(
        &https,
        "mtls.tsr",
        &[
            "--cacert",
            "ca-cert.pem",
            "--cert",
            "client-cert.pem",
            "--key",
            "client-key.pem",
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let mtls = saved_token(&d.join("mtls.tsr"));

    // A batch over HTTPS with the key, each token verified against the TSA's CA.
    let files = ["b1.txt", "b2.txt", "b3.txt"];
    for (i, file) in files.iter().enumerate() {
        std::fs::write(d.join(file), format!("batch item {i}")).unwrap();
    }
    let mut args = vec![
        "--batch",
        "--url",
        &https,
        "--cacert",
        "ca-cert.pem",
        "--api-key-file",
        "alice.key",
        "--ca",
        "ca-cert.pem",
    ];
    args.extend(files);
    let out = tsa_request(d, &args, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("3 of 3 granted and verified (1 batch)"),
        "{stdout}"
    );
    let batch: Vec<Vec<u8>> = files
        .iter()
        .map(|f| saved_token(&d.join(format!("{f}.tsr"))))
        .collect();

    let mut expected: Vec<(&[u8], Option<&str>)> = vec![
        (&keyed, Some("alice")),
        (&over_https, Some("alice")),
        (&mtls, Some("dev-client")),
    ];
    expected.extend(batch.iter().map(|t| (t.as_slice(), Some("alice"))));
    assert_archived(d, &expected);
}

/// What `tsa request` refuses before it sends anything: a key over plain HTTP to a host that
/// is not loopback (192.0.2.1 is TEST-NET-1: nothing is reached, and the message says so),
/// credentials in the URL, TLS files for an http:// URL, an empty key file.
#[test]
fn tsa_request_refuses_to_expose_a_key_before_connecting() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::write(w.join("doc.txt"), "a document").unwrap();
    std::fs::write(w.join("k.key"), "tsa_some-key\n").unwrap();
    std::fs::write(w.join("empty.key"), "\n").unwrap();
    let request = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["--data", "doc.txt", "--out", "r.tsr"];
        all.extend(args);
        tsa_request(w, &all, env)
    };
    // Nothing answers at 192.0.2.1: a client that tried to connect first would fail with
    // "cannot reach" (when its connection timed out), not with the refusal.
    let refusal = "refusing to send the API key over plain http:// to 192.0.2.1";
    let single = request(
        &["--url", "http://192.0.2.1:1/", "--api-key-file", "k.key"],
        &[],
    );
    assert_fails(&single, &[refusal, "https://", "--allow-insecure-key"]);
    let batch = tsa_request(
        w,
        &["--batch", "--url", "http://192.0.2.1:1/", "doc.txt"],
        &[("TSA_API_KEY", "tsa_some-key")],
    );
    assert_fails(&batch, &[refusal]);
    for out in [&single, &batch] {
        assert!(!String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
    }
    let out = request(&["--url", "http://me:tsa_some-key@127.0.0.1:1/"], &[]);
    assert_fails(&out, &["put no credentials in the URL"]);
    let out = request(
        &["--url", "http://127.0.0.1:1/", "--cacert", "doc.txt"],
        &[],
    );
    assert_fails(&out, &["are for https:// URLs"]);
    let out = request(
        &[
            "--url",
            "http://127.0.0.1:1/",
            "--api-key-file",
            "empty.key",
        ],
        &[],
    );
    assert_fails(&out, &["the API key file empty.key is empty"]);
    assert!(!w.join("r.tsr").exists() && !w.join("doc.txt.tsr").exists());
}

/// The SHA-256 fingerprint of the certificate the HTTPS listener at `https` presents.
fn served_fingerprint(https: &str, dir: &Path) -> String {
    let authority = https
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let out = Command::new("sh")
        .current_dir(dir)
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {authority} -CAfile ca-cert.pem </dev/null 2>/dev/null \
             | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn file_fingerprint(dir: &Path, pem: &str) -> String {
    let out = openssl(
        &["x509", "-in", pem, "-noout", "-fingerprint", "-sha256"],
        dir,
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn sighup_reloads_the_https_certificate_and_refuses_a_broken_one() {
    let dir = init(&["--tls", "--https-listen", "127.0.0.1:0"]);
    let server = Server::serve_logged(dir);
    let d = server.dir.path();
    let https = server.https_url.clone().expect("an HTTPS listener");
    let first = served_fingerprint(&https, d);
    assert_eq!(first, file_fingerprint(d, "tls-cert.pem"));

    // A new certificate for the same names from the same CA, in place of the old files.
    openssl_cert(
        d,
        "tls",
        "/CN=renewed",
        Some(("ca-cert.pem", "ca-key.pem")),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    let renewed = file_fingerprint(d, "tls-cert.pem");
    assert_ne!(renewed, first);
    server.signal("HUP");
    wait_until(
        || served_fingerprint(&https, d) == renewed,
        "the renewed certificate to be served",
    );
    let q = query(d, "renewed");
    let ca = d.join("ca-cert.pem").display().to_string();
    post(&https, &q, &["--cacert", &ca]).granted();

    // A broken key: the reload is refused, the renewed certificate stays and serves.
    let log = || std::fs::read_to_string(server.path(Server::LOG)).unwrap_or_default();
    assert!(!log().contains("reload_refused"), "{}", log());
    std::fs::write(d.join("tls-key.pem"), "not a key\n").unwrap();
    server.signal("HUP");
    wait_until(
        || log().contains("reload_refused"),
        "the reload to be refused",
    );
    assert!(log().contains("tls-key.pem"), "{}", log());
    assert_eq!(served_fingerprint(&https, d), renewed);
    post(&https, &q, &["--cacert", &ca]).granted();
}

#[test]
fn tsa_request_gives_up_on_a_server_that_never_answers() {
    // A listener that accepts connections (the kernel does) and never reads or answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", silent.local_addr().unwrap());
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("doc.txt"), "a document").unwrap();
    let out = tsa_request(
        work.path(),
        &[
            "--data",
            "doc.txt",
            "--out",
            "r.tsr",
            "--url",
            &url,
            "--timeout-s",
            "1",
        ],
        &[],
    );
    // Its own timeout ended it (the listener never answers).
    assert_fails(&out, &["no answer from", "within 1 s"]);
    assert!(!work.path().join("r.tsr").exists());
    drop(silent);
}

#[test]
fn keys_over_plain_http_are_refused_where_configured() {
    let dir = init(&["--tls", "--https-listen", "127.0.0.1:0"]);
    let (alice, alice_toml) = new_key("alice", &[]);
    configure(
        dir.path(),
        &[(
            "anonymous = true",
            "anonymous = true\nkeys_over_https_only = true",
        )],
        &alice_toml,
    );
    let server = Server::serve(dir);
    let d = server.dir.path();
    let q = query(d, "https-only");
    let key = format!("Authorization: Bearer {alice}");
    let ca = d.join("ca-cert.pem").display().to_string();

    // The same key: refused in clear, taken over TLS; no key in clear stays anonymous.
    post(&server.url, &q, &["-H", &key]).refused(401, FailInfo::BadRequest, "invalid credentials");
    let https = server.https_url.clone().expect("an HTTPS listener");
    let over_tls = post(&https, &q, &["--cacert", &ca, "-H", &key]).granted();
    let anonymous = post(&server.url, &q, &[]).granted();
    assert_archived(d, &[(&over_tls, Some("alice")), (&anonymous, None)]);
}

/// A batch's debt for the server's own failures is forgiven: with a clock that never
/// synchronizes (every answer timeNotAvailable), a client with 2 tokens refilling every 10 s
/// sends a batch of 6 (4 past its burst); after it the client waits a token's 10 s, not the
/// 50 s its debt would cost. The burst stays spent (the next request is 429): the server's
/// fast refusals are no way around the quota.
#[test]
fn a_batchs_debt_for_the_servers_failures_is_forgiven() {
    const BATCH: &str = "application/timestamp-query-batch";
    let dir = init(&[]);
    let (alice, alice_toml) = new_key("alice", &["--rate-per-s", "0.1", "--burst", "2"]);
    // NTP from ports where nothing answers; a production policy (the development policy is
    // the development clock's only).
    configure(
        dir.path(),
        &[(
            "source = \"development\"\n",
            "source = \"disciplined\"\nntp_servers = [\"127.0.0.1:9\", \"127.0.0.2:9\", \"127.0.0.3:9\"]\n",
        )],
        &format!("[auth]\n{alice_toml}"),
    );
    let path = dir.path().join("tsa.toml");
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        common::merge_toml(&config, "[policy]\ndefault = \"0.4.0.2023.1.1\"\n"),
    )
    .unwrap();
    let server = Server::serve(dir);
    let d = server.dir.path();
    let q = query(d, "unsynchronized");
    let key = format!("Authorization: Bearer {alice}");
    let items = batch_file(d, "alice", 6);
    let answer = curl_as(&server.url, &items, BATCH, &["-H", &key]).unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.header("retry-after"));
    let replies = tsa::protocol::batch::decode(&answer.body, 10).unwrap();
    assert_eq!(replies.len(), 6);
    for reply in replies {
        let reply = Response::from_der(reply).unwrap();
        assert_eq!(reply.fail_info(), Some(FailInfo::TimeNotAvailable));
    }
    let refused = post(&server.url, &q, &["-H", &key]);
    assert_eq!(refused.status, 429);
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=10).contains(&wait), "Retry-After {wait} s");
}
