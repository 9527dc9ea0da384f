//! The PKCS#11 signer against a real SoftHSM2 token, a real `tsa serve` and real `openssl`:
//! every test makes its own token with `tsa init --hsm` (its own `softhsm2.conf` and token
//! directory inside a temporary state directory, so tests run in parallel), then serves it.
//!
//! - tokens signed by the token key (P-256, P-384, RSA-2048 PKCS#1 v1.5) verify with
//!   `openssl ts -verify`; RSA-PSS ones with `openssl cms -verify` and `tsa verify`;
//! - the CSR is signed by the token key (`openssl req -verify`), the private key is sensitive
//!   and not extractable (`pkcs11-tool`), and the PIN comes from a file, an environment
//!   variable or a systemd credential, never the configuration;
//! - a wrong PIN, a missing token or key, and a certificate of another key refuse to start,
//!   with a clear message;
//! - moving the token directory away while the server runs gives `systemFailure` and a 503
//!   readiness, and moving it back brings the key back without a restart (with and without
//!   traffic noticing the loss); the CKR codes seen are printed;
//! - concurrent requests all get verified tokens, also while the token goes away and comes
//!   back under load: refusals are systemFailure only, and after the recovery every session
//!   of the pool signs again;
//! - two tokens of one module: the first going away and back leaves the second signing and
//!   ready throughout (the shared library is not re-initialized under it);
//! - a key deleted and generated anew under the same label and id is not used; two tokens with
//!   one label refuse to start;
//! - a module whose `C_Sign` stops answering (`hsm_support/faults.c` over SoftHSM2) takes the
//!   signer down after `sign_timeout_ms` and makes the server exit with status 75 after
//!   `exit_after_hung_ms`, also where the call that hangs is the archive writer's; started
//!   anew, it signs (and the archive verifies);
//! - with the PIN changed on the HSM's side, every session lost at once under load sends the
//!   wrong PIN once in all (`hsm_support/faults.c` counts the logins), and the recovery stops.
//!
//! SoftHSM2 and OpenSC's pkcs11-tool must be installed (`scripts/test.sh` installs them).

mod common;
#[path = "common/wire.rs"]
mod wire;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{curl_post, merge_toml, ok, openssl, run, TSA};
use tsa::client::read::Response;
use tsa::protocol::FailInfo;

const QUERY_TYPE: &str = "application/timestamp-query";

/// `tsa init --hsm` in a fresh directory, with `extra` TOML merged into the configuration.
fn init_hsm(init_args: &[&str], extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(Command::new(TSA)
        .args(["init", "--hsm", "--dir"])
        .arg(dir.path())
        .args(init_args));
    assert!(
        out.status.success(),
        "tsa init --hsm failed (SoftHSM2 missing? scripts/test.sh installs softhsm2): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !extra.is_empty() {
        edit_config(dir.path(), |config| merge_toml(config, extra));
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&str) -> String) {
    let path = dir.join("tsa.toml");
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(&config)).unwrap();
}

/// A running `tsa serve` whose log (`RUST_LOG=info`, no colours) goes to `log`.
struct HsmServer {
    dir: PathBuf,
    url: String,
    admin_url: String,
    log: PathBuf,
    child: Child,
}

impl HsmServer {
    fn start(dir: &Path, envs: &[(&str, &str)]) -> HsmServer {
        let log = dir.join("serve.log");
        let mut child = Command::new(TSA)
            .arg("serve")
            .arg("--config")
            .arg(dir.join("tsa.toml"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn tsa serve");
        let first = common::announce::first_line(&mut child);
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| {
                panic!(
                    "no URL in {first:?}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })
            .to_string();
        let admin_url = first
            .split("(admin ")
            .nth(1)
            .and_then(|s| s.strip_suffix(")\n"))
            .unwrap_or_else(|| panic!("no admin URL in {first:?}"))
            .to_string();
        HsmServer {
            dir: dir.to_path_buf(),
            url,
            admin_url,
            log,
            child,
        }
    }

    fn log(&self) -> String {
        // The fmt subscriber writes ANSI colours unless told otherwise; strip any.
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        strip_ansi(&text)
    }

    /// The HTTP status and body of `/health/ready`.
    fn readiness(&self) -> (u16, String) {
        common::readiness(&self.admin_url)
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits at most `limit` for the server to exit; its exit status and log.
    fn exit_within(&mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.log());
            }
            assert!(Instant::now() < deadline, "still running: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for HsmServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes `data.bin` and `req.tsq` (`openssl ts -query` with `args`) into `work`.
fn query(work: &Path, args: &[&str]) {
    std::fs::write(
        work.join("data.bin"),
        format!("stamped at {:?}\n", SystemTime::now()),
    )
    .unwrap();
    let mut all = vec!["ts", "-query", "-data", "data.bin", "-out", "req.tsq"];
    all.extend_from_slice(args);
    openssl(&all, work);
}

/// POSTs `req.tsq`; saves `reply.tsr`; the decoded reply.
fn post(server: &HsmServer, work: &Path) -> Response {
    let (status, _, body) = curl_post(&server.url, &work.join("req.tsq"), QUERY_TYPE);
    assert_eq!(status, 200);
    std::fs::write(work.join("reply.tsr"), &body).unwrap();
    Response::from_der(&body).expect("a TimeStampResp")
}

fn openssl_ts_verify(server: &HsmServer, work: &Path) {
    let ca = server.dir.join("ca-cert.pem");
    // The certificate installed in the state directory, for tokens that do not carry it.
    let tsu = server.dir.join("tsa-cert.pem");
    let out = run(Command::new("openssl").current_dir(work).args([
        "ts",
        "-verify",
        "-in",
        "reply.tsr",
        "-queryfile",
        "req.tsq",
        "-CAfile",
        ca.to_str().unwrap(),
        "-untrusted",
        tsu.to_str().unwrap(),
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Verification: OK"),
        "openssl ts -verify: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A stamp of a fresh document, granted and verified by `openssl ts -verify`.
fn stamp_and_verify(server: &HsmServer, work: &Path, args: &[&str]) {
    query(work, args);
    let response = post(server, work);
    assert!(response.granted(), "{:?}", response.status_text);
    openssl_ts_verify(server, work);
}

fn tokens_verify_with_openssl_ts(algorithm: &str, signature_oid_name: &str) {
    let dir = init_hsm(&["--algorithm", algorithm], "");
    let server = HsmServer::start(dir.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    for args in [
        &["-sha256", "-cert"][..],
        &["-sha384", "-cert"][..],
        &["-sha512", "-cert"][..],
    ] {
        stamp_and_verify(&server, work.path(), args);
    }
    let text = common::openssl_token_out(work.path());
    assert!(text.status.success());
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
        work.path(),
    );
    let printed = String::from_utf8(printed.stdout).unwrap();
    assert!(printed.contains(signature_oid_name), "{printed}");
    let log = server.log();
    assert!(log.contains("event=\"hsm_key_loaded\""), "{log}");
}

#[test]
fn p256_hsm_tokens_verify_with_openssl() {
    tokens_verify_with_openssl_ts("p256", "ecdsa-with-SHA256");
}

#[test]
fn p384_hsm_tokens_verify_with_openssl() {
    tokens_verify_with_openssl_ts("p384", "ecdsa-with-SHA384");
}

#[test]
fn rsa2048_pkcs1_hsm_tokens_verify_with_openssl() {
    tokens_verify_with_openssl_ts("rsa2048", "sha256WithRSAEncryption");
}

/// `openssl ts -verify` does not take RSASSA-PSS: `openssl cms -verify` and `tsa verify` do.
#[test]
fn rsa2048_pss_hsm_tokens_verify_with_openssl_cms_and_tsa_verify() {
    let dir = init_hsm(&["--algorithm", "rsa2048", "--pss"], "");
    let server = HsmServer::start(dir.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let ca = dir.path().join("ca-cert.pem");
    let ca = ca.to_str().unwrap();
    for digest in ["-sha256", "-sha512"] {
        query(w, &[digest, "-cert"]);
        let response = post(&server, w);
        let token = response.token.expect("granted");
        std::fs::write(w.join("token.der"), &token.der).unwrap();
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
        assert!(String::from_utf8_lossy(&printed.stdout).contains("rsassaPss"));
        openssl(
            &[
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
                "timestampsign",
                "-out",
                "tstinfo.der",
            ],
            w,
        );
        assert_eq!(
            std::fs::read(w.join("tstinfo.der")).unwrap(),
            token.tst_info_der
        );
        let out = ok(Command::new(TSA).current_dir(w).args([
            "verify",
            "--in",
            "reply.tsr",
            "--data",
            "data.bin",
            "--query",
            "req.tsq",
            "--ca",
            ca,
        ]));
        assert!(String::from_utf8_lossy(&out.stdout).contains("Verification: OK"));
    }
}

/// The PIN of a state directory made by `tsa init --hsm`.
fn pin(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("hsm-pin"))
        .unwrap()
        .trim()
        .to_string()
}

/// `SOFTHSM2_CONF` and module of a state directory made by `tsa init --hsm`.
fn softhsm_env(dir: &Path) -> (String, String) {
    let config: toml::Table = std::fs::read_to_string(dir.join("tsa.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let signer = config["signer"].as_table().unwrap();
    (
        signer["module_env"]["SOFTHSM2_CONF"]
            .as_str()
            .unwrap()
            .to_string(),
        signer["module"].as_str().unwrap().to_string(),
    )
}

/// OpenSC's `pkcs11-tool` on the state directory's token "tsa", logged in with its PIN.
fn pkcs11_tool(d: &Path, args: &[&str]) -> std::process::Output {
    let (conf, module) = softhsm_env(d);
    ok(Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &conf)
        .args([
            "--module",
            &module,
            "--token-label",
            "tsa",
            "--login",
            "--pin",
        ])
        .arg(pin(d))
        .args(args))
}

#[test]
fn the_csr_is_signed_by_the_token_key_which_never_leaves_the_token() {
    let dir = init_hsm(&["--algorithm", "p256"], "");
    let d = dir.path();
    // The CSR's signature verifies with the public key it carries, which is the certificate's.
    let csr = openssl(
        &["req", "-in", "tsa-csr.pem", "-verify", "-noout", "-pubkey"],
        d,
    );
    let cert_key = openssl(&["x509", "-in", "tsa-cert.pem", "-noout", "-pubkey"], d);
    assert_eq!(csr.stdout, cert_key.stdout);
    let text = openssl(&["req", "-in", "tsa-csr.pem", "-noout", "-text"], d);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("Time Stamping"), "{text}");
    assert!(
        !d.join("tsa-key.pem").exists(),
        "no key file beside the token"
    );

    // The PIN files are private; the configuration holds no PIN.
    use std::os::unix::fs::PermissionsExt;
    for file in ["hsm-pin", "hsm-so-pin"] {
        let mode = std::fs::metadata(d.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let config = std::fs::read_to_string(d.join("tsa.toml")).unwrap();
    assert!(!config.contains(&pin(d)), "the PIN is in the configuration");

    // OpenSC's view of the key: sensitive, never extractable.
    let out = pkcs11_tool(d, &["--list-objects", "--type", "privkey"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("tsa-tsu"), "{listing}");
    assert!(listing.contains("sensitive"), "{listing}");
    assert!(listing.contains("never extractable"), "{listing}");

    // `tsa hsm check` agrees, and signs.
    let out = ok(Command::new(TSA)
        .args(["hsm", "check", "--config"])
        .arg(d.join("tsa.toml")));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("CKA_SENSITIVE=Some(true) CKA_EXTRACTABLE=Some(false)"),
        "{report}"
    );
    // Generated there, for signing only: no warning.
    assert!(!report.contains("WARNING"), "{report}");
    assert!(report.contains("verified on the host"), "{report}");
}

/// A CSR from `tsa hsm csr` for a second key made by `tsa hsm keygen`, certified by the
/// development CA with openssl, installed with `tsa hsm install-cert`, then served.
/// Issues `csr` (in `dir`) as a TSU certificate `out` from the development CA: the TSU
/// profile (the only EKU id-kp-timeStamping, critical).
fn sign_tsu_csr(dir: &Path, csr: &str, out: &str) {
    std::fs::write(
        dir.join("ext.cnf"),
        "keyUsage = critical, digitalSignature\nextendedKeyUsage = critical, timeStamping\n\
         basicConstraints = critical, CA:FALSE\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "30",
            "-sha256",
            "-extfile",
            "ext.cnf",
            "-out",
            out,
        ],
        dir,
    );
}

#[test]
fn keygen_csr_and_install_cert_for_a_new_token_key() {
    let dir = init_hsm(&["--algorithm", "p256"], "");
    let d = dir.path();
    edit_config(d, |c| {
        c.replace("key_label = \"tsa-tsu\"", "key_label = \"tsu-2025\"")
            .lines()
            .filter(|l| !l.starts_with("key_id"))
            .map(|l| format!("{l}\n"))
            .collect()
    });
    let config = d.join("tsa.toml");
    let out = ok(Command::new(TSA)
        .args(["hsm", "keygen", "--algorithm", "p384", "--config"])
        .arg(&config));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ECDSA P-384"));
    // A key event in the operator's log (ETSI EN 319 421), the public key's hash with it.
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("hsm_key_generated") && log.contains("public_key_sha256"),
        "{log}"
    );
    ok(Command::new(TSA)
        .args([
            "hsm",
            "csr",
            "--subject",
            "C=VN,O=Example TSA,CN=Example TSU 2025",
            "--out",
        ])
        .arg(d.join("new.csr"))
        .arg("--config")
        .arg(&config));
    openssl(&["req", "-in", "new.csr", "-verify", "-noout"], d);
    sign_tsu_csr(d, "new.csr", "new.pem");
    // The old certificate belongs to the old key: install-cert refuses it for the new one.
    let refused = run(Command::new(TSA)
        .args(["hsm", "install-cert", "--cert"])
        .arg(d.join("tsa-cert.pem"))
        .arg("--config")
        .arg(&config));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("does not belong"));
    let installed = ok(Command::new(TSA)
        .args(["hsm", "install-cert", "--cert"])
        .arg(d.join("new.pem"))
        .arg("--config")
        .arg(&config));
    let log = String::from_utf8_lossy(&installed.stderr);
    assert!(log.contains("certificate_installed"), "{log}");
    let server = HsmServer::start(d, &[]);
    let work = tempfile::tempdir().unwrap();
    stamp_and_verify(&server, work.path(), &["-sha384", "-cert"]);
}

/// Runs `tsa serve` that must refuse to start; its stderr.
fn refused_start(dir: &Path, envs: &[(&str, &str)]) -> String {
    let (status, err) = refused_start_status(dir, envs);
    assert_eq!(status, Some(1), "{err}");
    err
}

/// [`refused_start`], with the exit status.
fn refused_start_status(dir: &Path, envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = Command::new(TSA)
        .arg("serve")
        .arg("--config")
        .arg(dir.join("tsa.toml"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "error")
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            assert!(!status.success(), "tsa serve started: {err}");
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tsa serve neither started nor refused within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_wrong_pin_a_missing_token_or_key_and_a_pin_in_the_config_refuse_to_start() {
    let dir = init_hsm(&[], "");
    let d = dir.path();
    let right = pin(d);
    std::fs::write(d.join("hsm-pin"), "0000\n").unwrap();
    // A status of its own, which the systemd units do not restart on: each restart would try
    // the wrong PIN again, until the token locks its user.
    let (status, err) = refused_start_status(d, &[]);
    assert_eq!(status, Some(78), "{err}");
    assert!(
        err.contains("PIN") && err.contains("CKR_PIN_INCORRECT"),
        "{err}"
    );
    for unit in ["tsa.service", "tsa@.service"] {
        let text = std::fs::read_to_string(Path::new("systemd").join(unit)).unwrap();
        assert!(text.contains("RestartPreventExitStatus=78"), "{unit}");
    }
    assert!(!err.contains(&right), "the PIN was printed");
    std::fs::write(d.join("hsm-pin"), format!("{right}\n")).unwrap();

    let config = std::fs::read_to_string(d.join("tsa.toml")).unwrap();
    let with = |from: &str, to: &str| {
        assert!(config.contains(from));
        std::fs::write(d.join("tsa.toml"), config.replace(from, to)).unwrap();
    };
    with("key_label = \"tsa-tsu\"", "key_label = \"no-such-key\"");
    let err = refused_start(d, &[]);
    assert!(
        err.contains("no private key with label 'no-such-key'"),
        "{err}"
    );
    with("token_label = \"tsa\"", "token_label = \"elsewhere\"");
    let err = refused_start(d, &[]);
    assert!(err.contains("token 'elsewhere' is not present"), "{err}");
    with("pin_file = \"hsm-pin\"", &format!("pin = \"{right}\""));
    // The configuration's own fault: EX_CONFIG, not restarted. A key or token not found may
    // be an HSM not there yet: 1, restarted.
    let (status, err) = refused_start_status(d, &[]);
    assert_eq!(status, Some(78), "{err}");
    assert!(err.contains("never read from the configuration"), "{err}");
    assert!(!err.contains(&right), "the PIN was printed");
    with("module = \"", "module = \"/nonexistent");
    let err = refused_start(d, &[]);
    assert!(err.contains("cannot load the PKCS#11 module"), "{err}");
}

#[test]
fn a_certificate_of_another_key_is_refused() {
    let one = init_hsm(&[], "");
    let other = init_hsm(&[], "");
    std::fs::copy(
        other.path().join("tsa-cert.pem"),
        one.path().join("tsa-cert.pem"),
    )
    .unwrap();
    let (status, err) = refused_start_status(one.path(), &[]);
    assert_eq!(status, Some(78), "not restarted: {err}");
    assert!(err.contains("does not belong to the signing key"), "{err}");
}

#[test]
fn the_pin_comes_from_an_environment_variable_or_a_systemd_credential() {
    let dir = init_hsm(&[], "");
    let d = dir.path();
    let the_pin = pin(d);
    let config = std::fs::read_to_string(d.join("tsa.toml")).unwrap();
    let work = tempfile::tempdir().unwrap();

    std::fs::write(
        d.join("tsa.toml"),
        config.replace("pin_file = \"hsm-pin\"", "pin_env = \"TSA_TEST_HSM_PIN\""),
    )
    .unwrap();
    let server = HsmServer::start(d, &[("TSA_TEST_HSM_PIN", &the_pin)]);
    stamp_and_verify(&server, work.path(), &["-sha256", "-cert"]);
    drop(server);
    // The configuration's to fix: EX_CONFIG, not restarted.
    let (status, err) = refused_start_status(d, &[]);
    assert_eq!(status, Some(78), "{err}");
    assert!(err.contains("TSA_TEST_HSM_PIN is not set"), "{err}");

    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("tsa-pin"), &the_pin).unwrap();
    std::fs::write(
        d.join("tsa.toml"),
        config.replace("pin_file = \"hsm-pin\"", "pin_credential = \"tsa-pin\""),
    )
    .unwrap();
    let server = HsmServer::start(
        d,
        &[(
            "CREDENTIALS_DIRECTORY",
            credentials.path().to_str().unwrap(),
        )],
    );
    stamp_and_verify(&server, work.path(), &["-sha256"]);
    let log = server.log();
    assert!(!log.contains(&the_pin), "the PIN is in the log");
}

/// The token directory of a `tsa init --hsm` state directory (one token).
/// Puts the token directory moved to `away` back and waits until the server is ready again.
fn bring_back(server: &HsmServer, away: &Path, token: &Path, what: &str) {
    std::fs::rename(away, token).unwrap();
    wait_for(what, Duration::from_secs(30), || {
        server.readiness().0 == 200
    });
}

fn token_dir(dir: &Path) -> PathBuf {
    let tokens = dir.join("softhsm/tokens");
    let mut entries: Vec<_> = std::fs::read_dir(&tokens)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries.remove(0)
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `ckr="…"` values of the log lines with `event="<event>"`.
fn ckrs(log: &str, event: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(&format!("event=\"{event}\"")))
        .filter_map(|l| {
            let at = l.find("ckr=")? + 4;
            let rest = l[at..].trim_start_matches('"');
            let end = rest.find(['"', ' ']).unwrap_or(rest.len());
            Some(format!(
                "{}{}",
                &rest[..end],
                l.find("function=")
                    .map(|f| format!(
                        " in {}",
                        l[f + 9..]
                            .split([' ', '"'])
                            .find(|s| !s.is_empty())
                            .unwrap_or("")
                    ))
                    .unwrap_or_default()
            ))
        })
        .filter(|c| !c.starts_with(" in") && !c.is_empty())
        .collect()
}

#[test]
fn removing_and_restoring_the_token_recovers_without_a_restart() {
    let dir = init_hsm(&[], "[signer]\nhealth_check_interval_ms = 200\n");
    let d = dir.path();
    let mut server = HsmServer::start(d, &[]);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    stamp_and_verify(&server, w, &["-sha256", "-cert"]);
    assert_eq!(server.readiness().0, 200);

    let token = token_dir(d);
    let away = d.join("token-moved-away");
    let started = Instant::now();

    // 1. Traffic notices: the next request fails with systemFailure, readiness turns 503.
    std::fs::rename(&token, &away).unwrap();
    query(w, &["-sha256", "-cert"]);
    let response = post(&server, w);
    assert!(!response.granted());
    assert_eq!(
        response.fail_bits,
        vec![FailInfo::SystemFailure.bit() as usize],
        "{:?}",
        response.status_text
    );
    let (code, text) = server.readiness();
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("HSM"), "{text}");
    // Still refused a while later (recovery keeps failing while the token is away).
    std::thread::sleep(Duration::from_millis(600));
    let response = post(&server, w);
    assert_eq!(
        response.fail_bits,
        vec![FailInfo::SystemFailure.bit() as usize]
    );
    assert_eq!(server.readiness().0, 503);

    bring_back(
        &server,
        &away,
        &token,
        "readiness after the token came back",
    );
    stamp_and_verify(&server, w, &["-sha256", "-cert"]);
    let first_outage = started.elapsed();

    // 2. No traffic: the health check notices, readiness turns 503 by itself.
    std::fs::rename(&token, &away).unwrap();
    wait_for(
        "readiness 503 without traffic",
        Duration::from_secs(30),
        || server.readiness().0 == 503,
    );
    bring_back(&server, &away, &token, "readiness after the second outage");
    stamp_and_verify(&server, w, &["-sha512"]);

    assert!(server.alive(), "the server exited");
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        log.matches("event=\"hsm_recovered\"").count(),
        2,
        "two recoveries expected:\n{log}"
    );
    let lost = ckrs(&log, "hsm_session_lost");
    let failed = ckrs(&log, "hsm_recovery_failed");
    let handle = ckrs(&log, "hsm_key_handle_invalid");
    println!("first outage and recovery took {first_outage:?}");
    println!("CKR codes, key handle invalid: {handle:?}");
    println!("CKR codes, session lost (signature, then health check): {lost:?}");
    let mut distinct = failed.clone();
    distinct.sort();
    distinct.dedup();
    println!("CKR codes, failed recovery attempts: {distinct:?}");
    let recovered: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("event=\"hsm_recovered\""))
        .collect();
    println!("recoveries: {recovered:#?}");
    assert_eq!(lost.len(), 2, "{log}");
}

#[test]
fn concurrent_requests_all_get_verified_tokens() {
    let dir = init_hsm(&[], "");
    edit_config(dir.path(), |c| c.replace("sessions = 4", "sessions = 2"));
    let server = HsmServer::start(dir.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    query(work.path(), &["-sha256", "-cert"]);
    let req = work.path().join("req.tsq");
    // Six clients × 20 requests (one query, so that any reply verifies against req.tsq).
    let replies: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..6)
            .map(|_| {
                scope.spawn(|| {
                    (0..20)
                        .map(|_| {
                            let (status, _, body) = curl_post(&server.url, &req, QUERY_TYPE);
                            assert_eq!(status, 200);
                            body
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().expect("a client thread"))
            .collect()
    });
    assert_eq!(replies.len(), 120);
    // Every one a token, each with its own serial number.
    let mut serials = std::collections::HashSet::new();
    for body in &replies {
        let response = Response::from_der(body).unwrap();
        assert!(response.granted(), "{:?}", response.status_text);
        let serial = response
            .token
            .expect("a token")
            .tst_info()
            .serial_number
            .as_bytes()
            .to_vec();
        assert!(serials.insert(serial), "a serial number issued twice");
    }
    // A sample across the clients verifies with openssl.
    for body in replies.iter().step_by(replies.len() / 5).take(5) {
        std::fs::write(work.path().join("reply.tsr"), body).unwrap();
        openssl_ts_verify(&server, work.path());
    }
}

/// Six keep-alive clients stamp without pause while the token goes away for a second and
/// comes back. Every reply is a token or a DER systemFailure; while the token is away nothing
/// is granted for long; after the recovery every client gets 50 tokens in a row (no session
/// of the pool left stale), and a sample of them verifies with `openssl ts -verify`.
#[test]
fn the_token_going_away_under_load_is_refused_cleanly_and_recovered() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let dir = init_hsm(&[], "[signer]\nhealth_check_interval_ms = 200\n");
    let d = dir.path();
    let mut server = HsmServer::start(d, &[]);
    let (granted, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let away_flag = Arc::new(AtomicBool::new(false));
    // Set once the token is back (readiness 200); then each client counts itself in
    // `clients_back` at its first grant for a request sent after that.
    let back = Arc::new(AtomicBool::new(false));
    let clients_back = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let url = server.url.clone();
            let (granted, refused, away_flag, back, clients_back, stop) = (
                granted.clone(),
                refused.clone(),
                away_flag.clone(),
                back.clone(),
                clients_back.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let (_, path) = wire::split_url(&url);
                let mut conn = wire::Conn::open(&url);
                // Tokens in a row since the last refusal, and the last one granted.
                let (mut in_a_row, mut last) = (0usize, None);
                let mut counted_back = false;
                for i in 0u32.. {
                    if stop.load(Ordering::Relaxed) && in_a_row >= 50 {
                        break;
                    }
                    let sent_after_back = back.load(Ordering::SeqCst);
                    let query = wire::query_for(format!("client {c} request {i}").as_bytes());
                    let der = query.to_der().unwrap();
                    let reply = conn.post(&path, &der);
                    assert_eq!(reply.status, 200, "{reply:?}");
                    let response = wire::decode(&reply);
                    if response.granted() {
                        granted.fetch_add(1, Ordering::Relaxed);
                        in_a_row += 1;
                        last = Some((der, reply.body));
                        if sent_after_back && !counted_back {
                            counted_back = true;
                            clients_back.fetch_add(1, Ordering::SeqCst);
                        }
                    } else {
                        assert_eq!(
                            response.fail_info(),
                            Some(FailInfo::SystemFailure),
                            "{:?}",
                            response.status_text
                        );
                        assert!(
                            away_flag.load(Ordering::Relaxed),
                            "refused while the token was there: {:?}",
                            response.status_text
                        );
                        refused.fetch_add(1, Ordering::Relaxed);
                        in_a_row = 0;
                    }
                }
                last.expect("a token")
            })
        })
        .collect();

    wait_for("tokens before the outage", Duration::from_secs(60), || {
        granted.load(Ordering::Relaxed) > 0
    });
    let (token, away) = (token_dir(d), d.join("token-moved-away"));
    away_flag.store(true, Ordering::Relaxed);
    std::fs::rename(&token, &away).unwrap();
    let before = granted.load(Ordering::Relaxed);
    wait_for("refusals under load", Duration::from_secs(60), || {
        refused.load(Ordering::Relaxed) > 0
    });
    wait_for("readiness 503", Duration::from_secs(60), || {
        server.readiness().0 == 503
    });
    // Away for a second at least.
    std::thread::sleep(Duration::from_millis(1000));
    bring_back(
        &server,
        &away,
        &token,
        "readiness after the token came back",
    );
    back.store(true, Ordering::SeqCst);
    // Refusals after each client's first grant since the token came back would be wrong:
    // every refusal still in flight has landed by then (each client has one request at a time).
    wait_for(
        "a grant to every client after the token came back",
        Duration::from_secs(60),
        || clients_back.load(Ordering::SeqCst) == 6,
    );
    away_flag.store(false, Ordering::SeqCst);
    stop.store(true, Ordering::Relaxed);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    for (c, client) in clients.into_iter().enumerate() {
        let (query, reply) = client.join().expect("a client thread");
        std::fs::write(w.join("req.tsq"), query).unwrap();
        std::fs::write(w.join("reply.tsr"), reply).unwrap();
        openssl_ts_verify(&server, w);
        println!("client {c}: its last token verifies");
    }
    assert!(server.alive(), "the server exited");
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("event=\"hsm_recovered\""), "{log}");
    println!(
        "granted {} (before the outage {before}), refused {}",
        granted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed)
    );
}

/// A recovery that meets a refused PIN stops, rather than lock the token's user PIN with
/// login after login; the server stays up, not ready, until restarted with the right PIN.
#[test]
fn a_refused_pin_stops_the_recovery() {
    let dir = init_hsm(&[], "[signer]\nhealth_check_interval_ms = 100\n");
    let d = dir.path();
    let mut server = HsmServer::start(d, &[]);
    let token = token_dir(d);
    let away = d.join("token-moved-away");
    std::fs::rename(&token, &away).unwrap();
    wait_for("readiness 503", Duration::from_secs(30), || {
        server.readiness().0 == 503
    });
    let right = pin(d);
    std::fs::write(d.join("hsm-pin"), "0000\n").unwrap();
    std::fs::rename(&away, &token).unwrap();
    wait_for("the recovery to stop", Duration::from_secs(30), || {
        server.log().contains("event=\"hsm_recovery_stopped\"")
    });
    let log = server.log();
    assert!(log.contains("CKR_PIN_INCORRECT"), "{log}");
    let logins = log.matches("CKR_PIN_INCORRECT").count();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        server.log().matches("CKR_PIN_INCORRECT").count(),
        logins,
        "more logins after the stop"
    );
    let (code, text) = server.readiness();
    assert_eq!(code, 503);
    assert!(text.contains("restart"), "{text}");
    assert!(server.alive());
    assert!(!server.log().contains(&right));

    std::fs::write(d.join("hsm-pin"), format!("{right}\n")).unwrap();
    drop(server);
    let server = HsmServer::start(d, &[]);
    let work = tempfile::tempdir().unwrap();
    stamp_and_verify(&server, work.path(), &["-sha256", "-cert"]);
}

/// A planned rollover between two keys of the same token: the new key made in the token
/// (`tsa hsm keygen`), its certificate installed, and `[rollover]` naming it; tokens change
/// key at the instant by their genTime.
#[test]
fn a_planned_rollover_to_a_new_token_key() {
    let dir = init_hsm(&["--algorithm", "p256"], "");
    let d = dir.path();
    // The next key's configuration: the same token, another label, its own certificate.
    let next_signer = new_token_key(
        d,
        "next",
        &[
            ("key_label", "\"tsu-next\"".into()),
            ("certificate", "\"next-cert.pem\"".into()),
        ],
        "p384",
        "C=VN,O=Example TSA,CN=TSU next",
    );

    // Far enough ahead that the start (a SoftHSM2 login) and the first tokens come before it.
    let at = chrono::Utc::now() + chrono::Duration::seconds(15);
    // The configuration names the instant to the millisecond, and the server switches there.
    let at_ns = at.timestamp_millis() as u64 * 1_000_000;
    edit_config(d, |c| {
        format!(
            "{c}\n[rollover]\nat = \"{}\"\n[rollover.signer]\n{next_signer}",
            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
    });
    let server = HsmServer::start(d, &[]);
    let first = openssl(&["x509", "-in", "tsa-cert.pem", "-outform", "DER"], d).stdout;
    let next = openssl(&["x509", "-in", "next-cert.pem", "-outform", "DER"], d).stdout;
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let work = tempfile::tempdir().unwrap();
    let (mut before, mut after) = (0, 0);
    while after < 5 {
        // Two tokens at the start, then none until a second before the instant (the clock
        // polled), then tokens until five carry the new key.
        if before == 2 {
            wait_for(
                "a second before the rollover",
                Duration::from_secs(60),
                || chrono::Utc::now() + chrono::Duration::seconds(1) >= at,
            );
        }
        assert!(
            chrono::Utc::now() < at + chrono::Duration::seconds(60),
            "a minute past the rollover: before {before}, after {after}"
        );
        query(work.path(), &["-sha256", "-cert"]);
        let response = post(&server, work.path());
        let token = response.token.expect("granted");
        let gen_time = token.tst_info().gen_time.unix_ns();
        if gen_time < at_ns {
            assert!(contains(&token.der, &first) && !contains(&token.der, &next));
            before += 1;
        } else {
            assert!(contains(&token.der, &next) && !contains(&token.der, &first));
            after += 1;
            openssl_ts_verify(&server, work.path());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(before > 0 && after >= 5, "before {before}, after {after}");
    // The key event names the new certificate, which a renewal under the same subject would
    // leave the subject alone to tell apart.
    let next_sha256 = tsa::archive::record::hex(&tsa::archive::record::sha256(&next));
    let rolled = server.log();
    let rollover = rolled
        .lines()
        .find(|l| l.contains("event=\"key_rollover\""))
        .unwrap_or_else(|| panic!("{rolled}"));
    assert!(rollover.contains(&next_sha256), "{rollover}");
    // No failure of the new key was reported before the instant.
    assert!(!rolled.contains("rollover_key_unusable"), "{rolled}");

    // Started again after the instant, it signs with the new key from the start, and says
    // so as the key it loaded: the rollover happened once, not at every start.
    drop(server);
    let server = HsmServer::start(d, &[]);
    query(work.path(), &["-sha256", "-cert"]);
    let token = post(&server, work.path()).token.expect("granted");
    assert!(contains(&token.der, &next) && !contains(&token.der, &first));
    let restarted = server.log();
    assert!(!restarted.contains("event=\"key_rollover\""), "{restarted}");
    assert!(
        restarted
            .lines()
            .any(|l| l.contains("event=\"key_loaded\"") && l.contains(&next_sha256)),
        "{restarted}"
    );
}

/// A second token in the state directory's SoftHSM2 configuration (`tsa hsm softhsm-init`),
/// with a P-256 key `tsu-b` certified by the development CA; the `[signer]` table for it.
fn second_token_signer(d: &Path, label: &str) -> String {
    ok(Command::new(TSA)
        .args(["hsm", "softhsm-init", "--label", label, "--dir"])
        .arg(d.join("softhsm"))
        .arg("--pin-file")
        .arg(d.join("hsm-pin"))
        .arg("--so-pin-file")
        .arg(d.join("hsm-so-pin")));
    new_token_key(
        d,
        "b",
        &[
            ("token_label", format!("\"{label}\"")),
            ("key_label", "\"tsu-b\"".into()),
            ("certificate", "\"b-cert.pem\"".into()),
        ],
        "p256",
        "C=VN,O=Example TSA,CN=TSU B",
    )
}

/// A new key in SoftHSM2 for the `[signer]` table of `tsa.toml` in `d` with the settings of
/// `changes` (and no `key_id`): made by `tsa hsm keygen` (`algorithm`), certified by the
/// development CA through `tsa hsm csr` (`subject`) and installed, all through the
/// configuration `<name>.toml`; the table for it.
fn new_token_key(
    d: &Path,
    name: &str,
    changes: &[(&str, String)],
    algorithm: &str,
    subject: &str,
) -> String {
    let config = std::fs::read_to_string(d.join("tsa.toml")).unwrap();
    let table = config
        .split("[signer]\n")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .expect("a [signer] table");
    let signer: String = table
        .lines()
        .filter(|l| !l.starts_with("key_id") && !l.starts_with('#'))
        .map(|l| {
            let key = l.split_once(" = ").map(|(k, _)| k);
            match changes.iter().find(|(k, _)| Some(*k) == key) {
                Some((k, v)) => format!("{k} = {v}\n"),
                None => format!("{l}\n"),
            }
        })
        .collect();
    let own_config = d.join(format!("{name}.toml"));
    std::fs::write(&own_config, config.replace(table, signer.trim_end())).unwrap();
    ok(Command::new(TSA)
        .args(["hsm", "keygen", "--algorithm", algorithm, "--config"])
        .arg(&own_config));
    let (csr, signed) = (format!("{name}.csr"), format!("{name}-signed.pem"));
    ok(Command::new(TSA)
        .args(["hsm", "csr", "--subject", subject, "--out"])
        .arg(d.join(&csr))
        .arg("--config")
        .arg(&own_config));
    sign_tsu_csr(d, &csr, &signed);
    ok(Command::new(TSA)
        .args(["hsm", "install-cert", "--cert"])
        .arg(d.join(&signed))
        .arg("--config")
        .arg(&own_config));
    signer
}

/// Two signers on two tokens of one module (the first key and a rollover key already in
/// force): the first token going away and coming back is recovered by its own pool without
/// touching the library under the other, whose signatures never fail and whose readiness
/// stays 200 throughout.
#[test]
fn one_tokens_outage_leaves_another_token_of_the_same_module_signing() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let dir = init_hsm(
        &["--algorithm", "p256"],
        "[signer]\nhealth_check_interval_ms = 100\n",
    );
    let d = dir.path();
    let token_a = token_dir(d);
    let signer_b = second_token_signer(d, "tsb");
    let at = chrono::Utc::now() - chrono::Duration::seconds(60);
    edit_config(d, |c| {
        format!(
            "{c}\n[rollover]\nat = \"{}\"\n[rollover.signer]\n{signer_b}",
            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
    });
    let mut server = HsmServer::start(d, &[]);
    let work = tempfile::tempdir().unwrap();
    stamp_and_verify(&server, work.path(), &["-sha256", "-cert"]);

    let (granted, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (url, granted, refused, stop) = (
            server.url.clone(),
            granted.clone(),
            refused.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let (_, path) = wire::split_url(&url);
            let mut conn = wire::Conn::open(&url);
            let mut last = None;
            for i in 0u32.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let query = wire::query_for(format!("request {i}").as_bytes());
                let der = query.to_der().unwrap();
                let reply = conn.post(&path, &der);
                assert_eq!(reply.status, 200, "{reply:?}");
                let response = wire::decode(&reply);
                if response.granted() {
                    granted.fetch_add(1, Ordering::Relaxed);
                    last = Some((der, reply.body));
                } else {
                    eprintln!("refused: {:?}", response.status_text);
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            last.expect("a token")
        })
    };

    let away = d.join("token-a-moved-away");
    std::fs::rename(&token_a, &away).unwrap();
    wait_for("token A's loss noticed", Duration::from_secs(30), || {
        server.log().contains("event=\"hsm_session_lost\"")
    });
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let (code, text) = server.readiness();
        assert_eq!(
            code, 200,
            "token B's readiness while token A is away: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::rename(&away, &token_a).unwrap();
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let (code, text) = server.readiness();
        assert_eq!(
            code, 200,
            "token B's readiness after token A came back: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let (query, reply) = client.join().expect("the client");
    std::fs::write(work.path().join("req.tsq"), query).unwrap();
    std::fs::write(work.path().join("reply.tsr"), reply).unwrap();
    std::fs::copy(d.join("b-cert.pem"), d.join("tsa-cert.pem")).unwrap();
    openssl_ts_verify(&server, work.path());
    assert!(server.alive(), "the server exited");
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        refused.load(Ordering::Relaxed),
        0,
        "token B refused:\n{log}"
    );
    assert!(granted.load(Ordering::Relaxed) > 0);
    assert!(
        log.contains("event=\"hsm_library_shared\""),
        "token A's recovery must not re-initialize the shared library:\n{log}"
    );
}

/// The key deleted and a new key pair generated under the same label and id while the server
/// runs: the signer finds a key again after its handle went stale, but not the certified one,
/// so it stops signing (systemFailure, readiness 503) rather than grant tokens that do not
/// verify.
#[test]
fn a_key_replaced_under_the_same_label_and_id_is_not_used() {
    let dir = init_hsm(&["--algorithm", "p256"], "");
    let d = dir.path();
    let server = HsmServer::start(d, &[]);
    let work = tempfile::tempdir().unwrap();
    stamp_and_verify(&server, work.path(), &["-sha256", "-cert"]);

    for class in ["privkey", "pubkey"] {
        pkcs11_tool(
            d,
            &["--delete-object", "--type", class, "--label", "tsa-tsu"],
        );
    }
    // The configuration names the key by label and id: the new pair gets both.
    ok(Command::new(TSA)
        .args(["hsm", "keygen", "--algorithm", "p256", "--config"])
        .arg(d.join("tsa.toml")));

    query(work.path(), &["-sha256", "-cert"]);
    let response = post(&server, work.path());
    assert!(
        !response.granted(),
        "a token signed by the new key was granted"
    );
    assert_eq!(
        response.fail_bits,
        vec![FailInfo::SystemFailure.bit() as usize],
        "{:?}",
        response.status_text
    );
    let (code, text) = server.readiness();
    assert_eq!(code, 503, "{text}");
    let log = server.log();
    assert!(!log.contains("event=\"hsm_key_refound\""), "{log}");
}

/// A key imported into the token (not generated there) is flagged: the token does not vouch
/// that it never left it, as ETSI EN 319 421 asks of TSU keys. `tsa hsm check` says so, and
/// the server logs it as an event at start.
#[test]
fn an_imported_key_is_flagged() {
    let dir = init_hsm(&[], "");
    let d = dir.path();
    // The development PKI's software key and its certificate, imported under another label.
    let software = tempfile::tempdir().unwrap();
    ok(Command::new(TSA)
        .args(["init", "--dir"])
        .arg(software.path()));
    let (conf, _) = softhsm_env(d);
    ok(Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args(["--import"])
        .arg(software.path().join("tsa-key.pem"))
        .args([
            "--token", "tsa", "--label", "imported", "--id", "0c0c", "--pin",
        ])
        .arg(pin(d)));
    let certificate = software.path().join("tsa-cert.pem");
    edit_config(d, |config| {
        let config = config.replace("key_label = \"tsa-tsu\"", "key_label = \"imported\"");
        let config = replace_line(&config, "key_id = ", "key_id = \"0c0c\"");
        config.replace(
            "certificate = \"tsa-cert.pem\"",
            &format!("certificate = \"{}\"", certificate.display()),
        )
    });
    let out = ok(Command::new(TSA)
        .args(["hsm", "check", "--config"])
        .arg(d.join("tsa.toml")));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("not generated on the token"), "{report}");
    let server = HsmServer::start(d, &[]);
    let log = server.log();
    assert!(
        log.contains("event=\"hsm_key_not_generated_on_token\""),
        "{log}"
    );
}

/// The configured key's id, in hex.
fn key_id(d: &Path) -> String {
    let config = std::fs::read_to_string(d.join("tsa.toml")).unwrap();
    let line = config
        .lines()
        .find(|l| l.starts_with("key_id = "))
        .expect("a key_id");
    line["key_id = ".len()..].trim_matches('"').to_string()
}

/// A P-256 key pair for signing made by pkcs11-tool on the state's token, with `label` and
/// `id` (hex) and `extra` options.
fn keypairgen(d: &Path, label: &str, id: &str, extra: &[&str]) {
    let args = [
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        label,
        "--id",
        id,
        "--usage-sign",
    ];
    pkcs11_tool(d, &[&args[..], extra].concat());
}

/// `tsa hsm check`'s exit and its output.
fn hsm_check(d: &Path) -> (bool, String) {
    let out = common::run(
        Command::new(TSA)
            .args(["hsm", "check", "--config"])
            .arg(d.join("tsa.toml")),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A private key deleted without its public key: `tsa hsm keygen` does not put a second
/// public key beside the one left behind, and two public keys of the key's id that differ
/// (one made beside it by another tool) are refused rather than one taken at the token's
/// choice.
#[test]
fn a_public_key_left_behind_is_not_taken_for_the_new_keys() {
    let dir = init_hsm(&["--algorithm", "p256"], "");
    let d = dir.path();
    let id = key_id(d);
    pkcs11_tool(d, &["--delete-object", "--type", "privkey", "--id", &id]);
    let out = common::run(
        Command::new(TSA)
            .args(["hsm", "keygen", "--algorithm", "p256", "--config"])
            .arg(d.join("tsa.toml")),
    );
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a key generated beside the public key left behind"
    );
    assert!(error.contains("public key with"), "{error}");

    keypairgen(d, "tsa-tsu", &id, &[]);
    let (ok, report) = hsm_check(d);
    assert!(!ok, "{report}");
    assert!(
        report.contains("public key objects with label 'tsa-tsu' and id"),
        "{report}"
    );
}

/// Another key pair with the same CKA_ID under another label (`pkcs11-tool --id` makes them
/// easily) is not taken for the configured key's: its public key goes by label and id.
#[test]
fn a_key_pair_of_the_same_id_under_another_label_is_not_the_keys() {
    let dir = init_hsm(&["--algorithm", "p256"], "");
    let d = dir.path();
    let id = key_id(d);
    keypairgen(d, "other", &id, &[]);
    // The private keys differ by label: the configured one is found by its own.
    edit_config(d, |config| replace_line(config, "key_id = ", ""));
    let (ok, report) = hsm_check(d);
    assert!(ok, "{report}");
}

/// A private key that asks for the PIN before each signature (CKA_ALWAYS_AUTHENTICATE) is
/// refused by name, not by the module's CKR_USER_NOT_LOGGED_IN at the first signature.
#[test]
fn a_key_that_needs_the_pin_for_each_signature_is_refused_by_name() {
    let dir = init_hsm(&["--algorithm", "p256"], "");
    let d = dir.path();
    let id = key_id(d);
    for class in ["privkey", "pubkey"] {
        pkcs11_tool(d, &["--delete-object", "--type", class, "--id", &id]);
    }
    keypairgen(d, "tsa-tsu", &id, &["--always-auth"]);
    let (ok, report) = hsm_check(d);
    assert!(!ok, "{report}");
    assert!(report.contains("CKA_ALWAYS_AUTHENTICATE"), "{report}");
}

/// `config` with the line that starts with `start` replaced by `line`.
fn replace_line(config: &str, start: &str, line: &str) -> String {
    config
        .lines()
        .map(|l| if l.starts_with(start) { line } else { l })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A module whose `C_Sign` stops answering (`hsm_support/faults.c`, over SoftHSM2, while a
/// file exists): the signer goes down after `sign_timeout_ms` (readiness 503, the next request
/// refused at once with systemFailure), and after `exit_after_hung_ms` the server stops and
/// exits with status 75 (a PKCS#11 call cannot be cancelled: only a new process loads the
/// module anew), which the systemd units restart. Started anew, with the module answering,
/// it signs.
#[test]
fn a_module_that_stops_answering_makes_the_server_exit_for_a_new_start() {
    let faulty = FaultyModule::init(&[], 4_000, "");
    let (d, flag, envs) = (faulty.dir.path(), &faulty.stall, faulty.envs());
    let mut server = HsmServer::start(d, &envs);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    stamp_and_verify(&server, w, &["-sha256", "-cert"]);

    // A request whose signature goes into the module and does not come back.
    std::fs::write(flag, b"").unwrap();
    query(w, &["-sha256"]);
    let hung = {
        let (url, request) = (server.url.clone(), w.join("req.tsq"));
        std::thread::spawn(move || {
            run(Command::new("curl")
                .args(["-sS", "--max-time", "60", "-o", "/dev/null"])
                .args([
                    "-H",
                    &format!("Content-Type: {QUERY_TYPE}"),
                    "--data-binary",
                ])
                .arg(format!("@{}", request.display()))
                .args(["-w", "%{http_code}", &url]))
        })
    };
    // Readiness says first that a call has not returned, then (the health check's verdict
    // after sign_timeout_ms) that the signer is down.
    wait_for("the signer to go down", Duration::from_secs(10), || {
        let (code, text) = server.readiness();
        code == 503 && text.contains("a signature has been inside the PKCS#11 module")
    });
    assert!(server.alive(), "exited before exit_after_hung_ms");
    // The next request is refused at once, not sent into the module after the first.
    let response = post(&server, w);
    assert_eq!(
        response.fail_bits,
        vec![FailInfo::SystemFailure.bit() as usize],
        "{:?}",
        response.status_text
    );

    // The server stops by itself and exits with 75.
    let log = faulty.exit_75(&mut server);
    assert!(log.contains("event=\"hsm_sign_timeout\""), "{log}");
    let exit = log
        .lines()
        .find(|l| l.contains("event=\"signer_hung_exit\""))
        .unwrap_or_else(|| panic!("no signer_hung_exit event: {log}"));
    assert!(exit.contains("exit_after_hung_ms = 4000"), "{exit}");
    // "… inside the PKCS#11 module PATH for N s …": not before exit_after_hung_ms.
    let hung_s: u64 = exit
        .split_once("faults.so for ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {exit}"));
    assert!(hung_s >= 4, "{exit}");
    assert!(
        log.contains("the TSA stopped for its service manager to start it anew"),
        "{log}"
    );
    // The request inside the module got no token: its connection ended with the process.
    let hung = hung.join().unwrap();
    assert_ne!(String::from_utf8_lossy(&hung.stdout), "200", "{hung:?}");

    // Started anew, with the module answering again: it signs.
    std::fs::remove_file(flag).unwrap();
    let server = HsmServer::start(d, &envs);
    stamp_and_verify(&server, w, &["-sha256", "-cert"]);
}

/// The same with the archive on, where the call that hangs is its writer's, signing a
/// checkpoint (for the events of a reload): the server still exits with 75, after giving the
/// writer 5 s to close, and the archive, recovered at the next start as after a crash,
/// verifies with the tokens of both runs.
#[test]
fn a_hung_archive_writer_does_not_keep_the_server_from_exiting() {
    let faulty = FaultyModule::init(
        &["--archive"],
        2_000,
        "[archive]\ncheckpoint_interval_s = 1\n",
    );
    let (d, flag, envs) = (faulty.dir.path(), &faulty.stall, faulty.envs());
    let mut server = HsmServer::start(d, &envs);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    stamp_and_verify(&server, w, &["-sha256", "-cert"]);

    // The reload's event has the writer sign a checkpoint within a second: in the module.
    std::fs::write(flag, b"").unwrap();
    ok(Command::new("kill").args(["-HUP", &server.child.id().to_string()]));
    let log = faulty.exit_75(&mut server);
    assert!(log.contains("event=\"certificate_reloaded\""), "{log}");
    assert!(
        log.contains("the archive's writer did not close (inside the signer?)"),
        "{log}"
    );

    std::fs::remove_file(flag).unwrap();
    let mut server = HsmServer::start(d, &envs);
    stamp_and_verify(&server, w, &["-sha256", "-cert"]);
    // Stopped as the service manager stops it: the writer signs a last checkpoint.
    ok(Command::new("kill").args(["-TERM", &server.child.id().to_string()]));
    assert!(server.child.wait().unwrap().success(), "{}", server.log());
    let out = run(Command::new(TSA)
        .args(["archive", "verify", "--config"])
        .arg(d.join("tsa.toml")));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("2 records verified"), "{text}");
    assert!(!text.contains("WARNING"), "{text}");
}

/// A stop (SIGTERM) while a signer's call hangs, before any `exit_after_hung_ms` (here
/// never), with the archive's writer the one inside the module: the stop gives the writer
/// 5 s, then ends the process without the module's exit handlers, with status 0.
#[test]
fn a_stop_while_the_signer_hangs_ends_the_process() {
    let faulty = FaultyModule::init(&["--archive"], 0, "[archive]\ncheckpoint_interval_s = 1\n");
    let (d, envs) = (faulty.dir.path(), faulty.envs());
    let mut server = HsmServer::start(d, &envs);
    let work = tempfile::tempdir().unwrap();
    stamp_and_verify(&server, work.path(), &["-sha256", "-cert"]);
    std::fs::write(&faulty.stall, b"").unwrap();
    ok(Command::new("kill").args(["-HUP", &server.child.id().to_string()]));
    wait_for(
        "the writer's signature to hang",
        Duration::from_secs(10),
        || server.log().contains("event=\"hsm_sign_timeout\""),
    );
    ok(Command::new("kill").args(["-TERM", &server.child.id().to_string()]));
    let (status, log) = server.exit_within(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("the archive's writer did not close (inside the signer?)"),
        "{log}"
    );
    assert!(log.contains("exiting without its exit handlers"), "{log}");
    assert!(!log.contains("signer_hung_exit"), "{log}");
}

/// A `tsa init --hsm` state directory whose signer's module is `hsm_support/faults.c` over
/// SoftHSM2, with short bounds for a hung call (`sign_timeout_ms` 500, and
/// `exit_after_hung_ms` as given). The module's `C_Sign` waits while `stall` exists; one that finds `drop_sessions`
/// removes it and closes every session first; each `C_Login` is counted in `logins`.
struct FaultyModule {
    dir: tempfile::TempDir,
    stall: PathBuf,
    drop_sessions: PathBuf,
    logins: PathBuf,
    lose_key: PathBuf,
    find_fails: PathBuf,
    softhsm: String,
    _tools: tempfile::TempDir,
}

impl FaultyModule {
    fn init(init_args: &[&str], exit_after_hung_ms: u64, extra: &str) -> FaultyModule {
        let tools = tempfile::tempdir().unwrap();
        let module = common::preload_library("tests/hsm_support/faults.c", tools.path());
        let dir = init_hsm(
            init_args,
            &format!(
                "[signer]\nhealth_check_interval_ms = 100\nsign_timeout_ms = 500\n\
                 exit_after_hung_ms = {exit_after_hung_ms}\n{extra}"
            ),
        );
        let (_, softhsm) = softhsm_env(dir.path());
        edit_config(dir.path(), |config| {
            replace_line(
                config,
                "module = ",
                &format!("module = \"{}\"", module.display()),
            )
        });
        let d = dir.path();
        FaultyModule {
            stall: d.join("stall"),
            drop_sessions: d.join("drop-sessions"),
            logins: d.join("logins"),
            lose_key: d.join("lose-key"),
            find_fails: d.join("find-fails"),
            dir,
            softhsm,
            _tools: tools,
        }
    }

    fn envs(&self) -> [(&str, &str); 6] {
        [
            ("TSA_TEST_REAL_MODULE", self.softhsm.as_str()),
            ("TSA_TEST_STALL_FILE", self.stall.to_str().unwrap()),
            (
                "TSA_TEST_DROP_SESSIONS",
                self.drop_sessions.to_str().unwrap(),
            ),
            ("TSA_TEST_LOGINS", self.logins.to_str().unwrap()),
            ("TSA_TEST_LOSE_KEY", self.lose_key.to_str().unwrap()),
            ("TSA_TEST_FIND_FAILS", self.find_fails.to_str().unwrap()),
        ]
    }

    /// How many times the module was asked to log in.
    fn logins(&self) -> usize {
        std::fs::read_to_string(&self.logins)
            .unwrap_or_default()
            .lines()
            .count()
    }

    /// Waits for `server` to exit by itself, with status 75; its log.
    fn exit_75(&self, server: &mut HsmServer) -> String {
        let (status, log) = server.exit_within(Duration::from_secs(40));
        assert_eq!(status.code(), Some(75), "{log}");
        log
    }
}

/// A key handle gone stale, then the search for the key again failing in the module (an
/// operation's error, not a lost session or token): the request is refused, and the signer
/// stays up (no recovery, no login again) for the next one, which is granted.
#[test]
fn a_failed_search_for_a_stale_key_refuses_the_request_not_the_signer() {
    let faulty = FaultyModule::init(&[], 60_000, "");
    let server = HsmServer::start(faulty.dir.path(), &faulty.envs());
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    stamp_and_verify(&server, w, &["-sha256", "-cert"]);
    let logins = faulty.logins();

    std::fs::write(&faulty.find_fails, b"").unwrap();
    std::fs::write(&faulty.lose_key, b"").unwrap();
    let response = post(&server, w);
    assert!(!faulty.lose_key.exists(), "the key handle was not lost");
    assert!(!response.granted(), "granted with the key lost");
    assert_eq!(
        response.fail_bits,
        vec![FailInfo::SystemFailure.bit() as usize],
        "{:?}",
        response.status_text
    );
    std::fs::remove_file(&faulty.find_fails).unwrap();
    stamp_and_verify(&server, w, &["-sha256", "-cert"]);
    let log = server.log();
    assert!(log.contains("event=\"hsm_key_handle_invalid\""), "{log}");
    assert!(log.contains("CKR_FUNCTION_FAILED"), "{log}");
    assert!(!log.contains("event=\"hsm_session_lost\""), "{log}");
    assert!(!log.contains("event=\"hsm_recovery_attempt\""), "{log}");
    assert_eq!(faulty.logins(), logins, "logged in again: {log}");
    let (code, text) = server.readiness();
    assert_eq!(code, 200, "{text}\n{log}");
}

/// The PIN changed on the HSM's side while the TSA runs, then every session lost at once
/// under load (the module closes them all, which logs the application out): the sessions
/// replaced at once send the wrong PIN once in all, not once each, and the recovery stops
/// without another login (`hsm_recovery_stopped`). A token that locks its user after a few
/// wrong PINs would otherwise be locked by the pool itself.
#[test]
fn sessions_replaced_at_once_send_a_refused_pin_once() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let faulty = FaultyModule::init(&[], 60_000, "");
    let d = faulty.dir.path();
    let server = HsmServer::start(d, &faulty.envs());
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    stamp_and_verify(&server, w, &["-sha256", "-cert"]);
    let before = faulty.logins();
    assert!(before >= 1, "the start logged in");

    // The PIN file no longer holds the token's PIN.
    std::fs::write(d.join("hsm-pin"), "99999999\n").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (url, request, stop) = (server.url.clone(), w.join("req.tsq"), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    curl_post(&url, &request, QUERY_TYPE);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&faulty.drop_sessions, b"").unwrap();
    wait_for("the recovery to stop", Duration::from_secs(30), || {
        server.log().contains("event=\"hsm_recovery_stopped\"")
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    let log = server.log();
    assert!(
        !faulty.drop_sessions.exists(),
        "the sessions were not dropped"
    );
    assert!(log.contains("CKR_PIN_INCORRECT"), "{log}");
    assert_eq!(faulty.logins() - before, 1, "wrong PINs sent: {log}");
    assert_eq!(server.readiness().0, 503);
}

/// Two tokens with the token label of the configuration: the signer does not guess.
#[test]
fn two_tokens_with_one_label_refuse_to_start() {
    let dir = init_hsm(&[], "");
    let d = dir.path();
    let (conf, _) = softhsm_env(d);
    ok(Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args([
            "--init-token",
            "--free",
            "--label",
            "tsa",
            "--so-pin",
            "12345678",
            "--pin",
            "87654321",
        ]));
    let err = refused_start(d, &[]);
    assert!(err.contains("2 tokens have the label 'tsa'"), "{err}");
}
