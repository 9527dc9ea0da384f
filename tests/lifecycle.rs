//! Lifecycle: SIGHUP reloads the certificate chain and the reloadable settings without
//! dropping connections (and refuses a bad reload); issuance stops when the signing
//! certificate has less validity left than configured; `tsa serve` refuses to start on a TSU
//! certificate outside the profile.

#[path = "common/clock.rs"]
mod clock;
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

/// A reload cannot change the clock: the tokens' policy and declared accuracy rest on the
/// clock the server runs. A development server's file edited to the kernel clock (whose tokens
/// would carry the ETSI policy) is refused on SIGHUP, and its tokens keep the development
/// policy. A reload that changes `[archive]` is taken, and says the archive stays as started.
#[test]
fn a_reload_that_changes_the_clock_is_refused() {
    let server = Server::serve_logged(Server::init(&[], ""));
    let config_path = server.path("tsa.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let log = || std::fs::read_to_string(server.path(Server::LOG)).unwrap_or_default();
    let edit = |from: &str, to: &str| {
        assert!(config.contains(from), "{config}");
        std::fs::write(&config_path, config.replace(from, to)).unwrap();
    };
    edit("source = \"development\"", "source = \"kernel\"");
    server.signal("HUP");
    common::wait_until(
        || log().contains("reload_refused"),
        "the reload to be refused",
    );
    assert!(log().contains("[clock] changed"), "{}", log());
    let response = stamp_once(&server);
    assert!(response.granted(), "{:?}", response.status_text);
    let policy = response.token.as_ref().unwrap().tst_info().policy;
    assert_eq!(
        policy.to_string(),
        "1.3.6.1.4.1.32473.3161.1",
        "the development policy"
    );

    edit("enabled = false", "enabled = true");
    server.signal("HUP");
    common::wait_until(|| log().contains("reload_partial"), "the reload's warning");
    assert!(log().contains("[archive]"), "{}", log());
    assert_eq!(log().matches("reload_refused").count(), 1, "{}", log());
}

/// A planned rollover's instant written with an offset and a fraction of a second is the same
/// instant at a reload: the reload is taken (every one was refused as "[rollover] changed"
/// unless the instant was written as the server prints it).
#[test]
fn a_reload_takes_a_rollover_instant_written_with_an_offset() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(Command::new(common::TSA).args(["init", "--dir"]).arg(d));
    ec_key(d, "P-256", "next-key.pem");
    issue_cert(d, "next-key.pem", "/CN=TSU after rollover", "next-cert.pem");
    let at = (chrono::Utc::now() + chrono::Duration::days(1))
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, false);
    assert!(at.ends_with("+02:00"), "{at}");
    let config_path = d.join("tsa.toml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let extra = format!(
        "[rollover]\nat = \"{at}\"\n[rollover.signer]\nkind = \"software\"\nkey = \"next-key.pem\"\ncertificate = \"next-cert.pem\"\n"
    );
    let config = common::merge_toml(&text, &extra);
    std::fs::write(&config_path, &config).unwrap();
    let server = Server::serve_logged(dir);
    assert!(config.contains("precision = \"micros\""), "{config}");
    std::fs::write(
        &config_path,
        config.replace("precision = \"micros\"", "precision = \"millis\""),
    )
    .unwrap();
    server.signal("HUP");
    let log = || std::fs::read_to_string(server.path(Server::LOG)).unwrap_or_default();
    common::wait_until(
        || log().contains("certificate_reloaded") || log().contains("reload_refused"),
        "the reload",
    );
    assert!(!log().contains("reload_refused"), "{}", log());
    // The reload's event says what the tokens now carry.
    assert!(
        log().contains("chain_changed=false") && log().contains("precision=Millis"),
        "{}",
        log()
    );
    let response = stamp_once(&server);
    let gen_time = response
        .token
        .as_ref()
        .unwrap()
        .tst_info()
        .gen_time
        .unix_ns();
    assert_eq!(
        gen_time % 1_000_000,
        0,
        "millisecond precision after the reload"
    );
}

#[test]
fn a_bad_reload_is_refused_and_the_running_certificate_kept() {
    let server = Server::serve_logged(Server::init(&[], ""));
    let dir = server.dir.path().to_path_buf();
    // A certificate for another key: the reload must refuse it.
    ec_key(&dir, "P-256", "other-key.pem");
    issue_cert(&dir, "other-key.pem", "/CN=Someone Else", "other.pem");
    std::fs::copy(dir.join("other.pem"), dir.join("tsa-cert.pem")).unwrap();
    let log = || std::fs::read_to_string(server.path(Server::LOG)).unwrap_or_default();
    assert!(!log().contains("reload_refused"), "{}", log());
    server.signal("HUP");
    common::wait_until(
        || log().contains("reload_refused"),
        "the reload to be refused",
    );
    assert!(
        log().contains("does not belong to the signing key"),
        "{}",
        log()
    );
    assert!(subject_of(&server).contains("Development Time-Stamping Unit"));
    assert!(stamp_once(&server).granted());
    // A new key named beside its certificate: a reload keeps the running key, so it is
    // refused, and says that a new key takes a restart.
    let config_path = server.path("tsa.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    assert!(config.contains("key = \"tsa-key.pem\""), "{config}");
    std::fs::write(
        &config_path,
        config.replace("key = \"tsa-key.pem\"", "key = \"other-key.pem\""),
    )
    .unwrap();
    server.signal("HUP");
    common::wait_until(
        || log().matches("reload_refused").count() == 2,
        "the second reload to be refused",
    );
    assert!(
        log().contains("restart to sign with a new key"),
        "{}",
        log()
    );
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

/// A new EC key on `curve` (`P-256`, `P-384`) as `out` in `dir`, by `openssl genpkey`.
fn ec_key(dir: &Path, curve: &str, out: &str) {
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            &format!("ec_paramgen_curve:{curve}"),
            "-out",
            out,
        ],
        dir,
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
    ec_key(dir.path(), "P-384", "next-key.pem");
    issue_cert(
        dir.path(),
        "next-key.pem",
        "/CN=TSU after rollover",
        "next-cert.pem",
    );
    let first = cert_der(&dir.path().join("tsa-cert.pem"));
    let next = cert_der(&dir.path().join("next-cert.pem"));

    // Far enough ahead that the start and the first checks surely come before it.
    let at = chrono::Utc::now() + chrono::Duration::seconds(15);
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

    // A few tokens at once; then, the clock polled until a second before the instant, one
    // every 20 ms on one keep-alive connection (a new one: the first may have idled out) until
    // well past it.
    // The instant as the configuration names it: to the millisecond.
    let at_ns = at.timestamp_millis() as u64 * 1_000_000;
    let mut conn = Conn::open(&server.url);
    let (mut before, mut after) = (0, 0);
    let mut waited = false;
    let work = server.path("work");
    std::fs::create_dir_all(&work).unwrap();
    while after < 20 {
        if before == 3 && !waited {
            clock::wait_for(
                || chrono::Utc::now() + chrono::Duration::seconds(1) >= at,
                "a second before the rollover",
                Duration::from_secs(60),
            );
            conn = Conn::open(&server.url);
            waited = true;
        }
        assert!(
            chrono::Utc::now() < at + chrono::Duration::seconds(60),
            "a minute past the rollover: before {before}, after {after}"
        );
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

/// The TSU profile's extensions (as `tsa init` writes them), for `openssl` extension files.
const TSU_PROFILE: &str =
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                           extendedKeyUsage=critical,timeStamping\n";

/// A certificate for the TSU key of `dir` (`tsa-key.pem`), subject `cn`, issued by the
/// development CA with the extensions `ext` by `openssl ca`, valid from `start` to `end`
/// (`YYYYMMDDHHMMSSZ`), as `tsa-cert.pem`.
fn issue_tsu_cert(dir: &Path, cn: &str, ext: &str, (start, end): (&str, &str)) {
    std::fs::write(dir.join("ext.cnf"), ext).unwrap();
    std::fs::write(
        dir.join("ca.cnf"),
        "[ca]\ndefault_ca = dev\n[dev]\ndatabase = index.txt\nnew_certs_dir = .\n\
         serial = serial\nrand_serial = yes\ndefault_md = sha256\npolicy = any\n\
         unique_subject = no\n[any]\ncommonName = supplied\n",
    )
    .unwrap();
    std::fs::write(dir.join("index.txt"), "").unwrap();
    openssl(
        &[
            "req",
            "-new",
            "-key",
            "tsa-key.pem",
            "-subj",
            &format!("/CN={cn}"),
            "-out",
            "tsu.csr",
        ],
        dir,
    );
    openssl(
        &[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-cert",
            "ca-cert.pem",
            "-keyfile",
            "ca-key.pem",
            "-in",
            "tsu.csr",
            "-startdate",
            start,
            "-enddate",
            end,
            "-extfile",
            "ext.cnf",
            "-notext",
            "-out",
            "tsa-cert.pem",
        ],
        dir,
    );
}

/// Starts `tsa serve` on the configuration in `dir` and stops it once it has announced its
/// listeners; its standard error when it exits instead.
fn serve_once(dir: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut child = Command::new(common::TSA)
        .arg("serve")
        .arg("--config")
        .arg(dir.join("tsa.toml"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tsa serve");
    let first = common::announce::first_line(&mut child);
    if !first.is_empty() {
        let _ = child.kill();
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    if first.is_empty() {
        // EX_CONFIG, which the systemd units do not restart on: started again, the TSA
        // would refuse the same certificate.
        assert_eq!(
            status.code(),
            Some(78),
            "a refused certificate's exit: {err}"
        );
        Err(err)
    } else {
        Ok(())
    }
}

/// The development clock says at start whether the kernel counts the system clock
/// synchronized: where it does not, nothing vouches for the declared accuracy, and the log
/// says so.
#[test]
fn the_development_clock_tells_when_the_kernel_does_not_vouch_for_the_system_clock() {
    // SAFETY: `timex` is plain data; modes 0 only reads.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::adjtimex(&mut tx) };
    let unsynchronized = rc < 0 || rc == libc::TIME_ERROR || tx.status & libc::STA_UNSYNC != 0;
    let server = Server::serve_logged(Server::init(&[], ""));
    assert!(stamp_once(&server).granted());
    let log = std::fs::read_to_string(server.path(Server::LOG)).unwrap();
    assert!(log.contains("development_clock"), "{log}");
    assert_eq!(
        log.contains("the kernel does not count the system clock synchronized"),
        unsynchronized,
        "kernel status {:#x}, rc {rc}: {log}",
        tx.status
    );
}

/// A signing key or an HTTPS listener's key that other users may read stops the start, with
/// exit 78 (EX_CONFIG: the units do not restart it, as a restart would meet the same file).
#[test]
fn a_key_other_users_may_read_stops_the_start_for_good() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(Command::new(common::TSA)
        .args(["init", "--tls", "--dir"])
        .arg(d));
    for key in ["tsa-key.pem", "tls-key.pem"] {
        let path = d.join(key);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = serve_once(d).expect_err(&format!("{key}: tsa serve started"));
        assert!(err.contains(key), "{key}: {err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    serve_once(d).unwrap_or_else(|e| panic!("the keys private again: {e}"));
}

/// A chain that did not issue the TSU certificate (another development CA of the same name)
/// stops the start for good (exit 78), and `tsa check` says why; with its own CA's certificate
/// the server starts, and `tsa check --signatures` times the signer.
#[test]
fn a_chain_that_did_not_issue_the_tsu_certificate_stops_the_start() {
    let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let d = dir.path();
    for state in [d, other.path()] {
        ok(Command::new(common::TSA).args(["init", "--dir"]).arg(state));
    }
    let config = d.join("tsa.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let with_chain = |ca: &Path| {
        let line = "certificate = \"tsa-cert.pem\"";
        assert!(original.contains(line));
        let chain = format!("{line}\nchain = [\"{}\"]", ca.display());
        std::fs::write(&config, original.replace(line, &chain)).unwrap();
    };
    let check = |args: &[&str]| {
        let out = common::run(
            Command::new(common::TSA)
                .args(["check", "--config"])
                .arg(&config)
                .args(args),
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    with_chain(&other.path().join("ca-cert.pem"));
    let err = serve_once(d).expect_err("started with another CA's certificate as its chain");
    assert!(err.contains("not its key"), "{err}");
    let (checked, text) = check(&[]);
    assert!(!checked && text.contains("not its key"), "{text}");

    with_chain(&d.join("ca-cert.pem"));
    serve_once(d).unwrap_or_else(|e| panic!("its own CA: {e}"));
    let (checked, text) = check(&["--signatures", "50"]);
    assert!(checked, "{text}");
    assert!(
        text.contains("rate: 50 signatures on 1 thread(s)"),
        "{text}"
    );
}

/// `tsa serve` refuses to start on a certificate of its own key from its own CA that a verifier
/// or the TSU profile (RFC 3161 2.3, ETSI EN 319 422) would refuse, and says why: a CA
/// certificate, no extended key usage, another one beside id-kp-timeStamping, one not marked
/// critical, a key usage without digitalSignature (or nonRepudiation), a certificate not valid
/// yet. The same key with the profile's certificate starts.
#[test]
fn serve_refuses_to_start_on_a_tsu_certificate_outside_the_profile() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(Command::new(common::TSA).args(["init", "--dir"]).arg(d));
    let now = chrono::Utc::now();
    let stamp = |t: chrono::DateTime<chrono::Utc>| t.format("%Y%m%d%H%M%SZ").to_string();
    let (valid_from, valid_to) = (
        stamp(now - chrono::Duration::days(1)),
        stamp(now + chrono::Duration::days(30)),
    );
    let valid = (valid_from.as_str(), valid_to.as_str());
    let (later_from, later_to) = (
        stamp(now + chrono::Duration::days(1)),
        stamp(now + chrono::Duration::days(30)),
    );
    let not_yet = (later_from.as_str(), later_to.as_str());
    let without = |line: &str| TSU_PROFILE.replace(line, "");
    let cases: Vec<(&str, String, (&str, &str), &str)> = vec![
        (
            "CA certificate",
            TSU_PROFILE.replace("CA:FALSE", "CA:TRUE"),
            valid,
            "is a CA certificate; a TSU certificate must not be",
        ),
        (
            "No EKU",
            without("extendedKeyUsage=critical,timeStamping\n"),
            valid,
            "has no extended key usage",
        ),
        (
            "Extra EKU",
            TSU_PROFILE.replace("timeStamping", "timeStamping,serverAuth"),
            valid,
            "must have id-kp-timeStamping as its only extended key usage",
        ),
        (
            "Non-critical EKU",
            TSU_PROFILE.replace("extendedKeyUsage=critical,", "extendedKeyUsage="),
            valid,
            "the extended key usage of the certificate of CN=Non-critical EKU must be critical",
        ),
        (
            "Key agreement only",
            TSU_PROFILE.replace("digitalSignature", "keyAgreement"),
            valid,
            "allows neither digitalSignature nor nonRepudiation",
        ),
        (
            "Not yet valid",
            TSU_PROFILE.to_string(),
            not_yet,
            "is not valid before",
        ),
        (
            "Unknown critical extension",
            format!("{TSU_PROFILE}1.3.6.1.4.1.32473.99=critical,ASN1:NULL\n"),
            valid,
            "has a critical extension 1.3.6.1.4.1.32473.99 that verifiers do not process",
        ),
    ];
    for (cn, ext, dates, expected) in &cases {
        issue_tsu_cert(d, cn, ext, *dates);
        let err = serve_once(d).expect_err(&format!("{cn}: tsa serve started"));
        assert!(
            err.contains(&format!("CN={cn}")) && err.contains(expected),
            "{cn}: {err}"
        );
    }
    // The key and the CA are not what is refused.
    issue_tsu_cert(d, "Within the profile", TSU_PROFILE, valid);
    serve_once(d).unwrap_or_else(|e| panic!("the profile's certificate: {e}"));
}

/// A SIGHUP while the server is still being built (here its archive's database takes its
/// connection and never answers, as a PostgreSQL that hangs would) neither ends the process
/// (the signal's default action did, before its handler was installed after the build) nor
/// is acted on before the server is up.
#[test]
fn a_sighup_while_the_server_is_built_does_not_end_it() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (connected, build_waits) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for connection in listener.incoming().take(4).flatten() {
            kept.push(connection);
            let _ = connected.send(());
        }
        std::thread::sleep(Duration::from_secs(60));
    });
    let dir = Server::init(&[], "");
    let config_path = dir.path().join("tsa.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let archive = format!(
        "[archive]\nbackend = \"postgres\"\n\
         postgres_url = \"host=127.0.0.1 port={port} user=tsa dbname=tsa connect_timeout=30\"\n"
    );
    let config = config.replacen("[archive]\n", &archive, 1).replacen(
        "enabled = false",
        "enabled = true",
        1,
    );
    assert!(config.contains("backend = \"postgres\"") && config.contains("enabled = true"));
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(common::TSA)
        .args(["serve", "--config"])
        .arg(dir.path().join("tsa.toml"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The build has reached the archive (the handler is installed before it) and waits.
    build_waits
        .recv_timeout(Duration::from_secs(30))
        .expect("the server connects to its database");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the server is still being built (waiting for its database)"
    );
    // SAFETY: a signal to the child we spawned, which has not been reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    std::thread::sleep(Duration::from_millis(500));
    let status = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, None, "the SIGHUP ended the process");
}
