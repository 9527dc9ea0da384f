//! What an HSM-held key costs: the raw PKCS#11 signing rate of a SoftHSM2 token beside
//! issuance through the TSA's PKCS#11 signer, on the same token and key, so that the ratio
//! reads directly.
//!
//! Set-up: `tsa init --hsm --algorithm p256` in a temporary directory (a SoftHSM2 token of its
//! own, `SOFTHSM2_CONF` pointing into it), through `CARGO_BIN_EXE_tsa`. Criterion group
//! `hsm-p256`, one thread, latencies:
//!
//! - `1_raw_cryptoki_sign`: `C_SignInit` + `C_Sign` (`CKM_ECDSA`) of a SHA-256 digest on one
//!   logged-in session, through cryptoki and nothing else: the token's own cost;
//! - `2_signer_sign`: `Pkcs11Signer::sign` of real signed attributes: host digest, a session
//!   from the pool, the same mechanism, DER `ECDSA-Sig-Value`;
//! - `3_issue`: one whole `Tsa::issue(&request_der)` on a `Tsa` from `tsa::server::build`
//!   with the PKCS#11 signer (parse, serial, clock, build, sign, assemble).
//!
//! With `--bench`, after criterion, a throughput table: signatures per second for about 3 s
//! each, with 1 and 2 threads (`HSM_BENCH_THREADS="1 2 4"` for others), of raw cryptoki (a
//! session per thread) and of `Tsa::issue` (the signer's pool, 16 sessions here), and of as
//! many processes (`tsa hsm check --signatures`, summed), each as a share of the raw
//! single-thread rate. `TSA_BIN` names another `tsa` binary for the set-up and the processes.
//!
//! ```sh
//! cargo bench --bench hsm
//! ```
//!
//! Under `cargo test --all-targets` each benchmark runs once (criterion's test mode). SoftHSM2
//! must be installed (`scripts/test.sh` installs it).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{black_box, Criterion};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use tsa::alg::DigestAlgorithm;
use tsa::client::read::Response;
use tsa::client::Query;
use tsa::config::{Config, SignerConfig};
use tsa::server::{self, Tsa};
use tsa::signer::pkcs11::token::Module;
use tsa::signer::pkcs11::{pool, Pkcs11Config, Pkcs11Signer};
use tsa::signer::Signer;

/// The `tsa` binary cargo built with this bench (`TSA_BIN` overrides it).
fn tsa_bin() -> String {
    std::env::var("TSA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tsa").into())
}
const GROUP: &str = "hsm-p256";

struct Fixture {
    dir: tempfile::TempDir,
    pkcs11: Pkcs11Config,
    /// The raw side: its own module handle, sessions and key handle.
    module: Module,
    tsa: Tsa,
    signer: Pkcs11Signer,
    request: Vec<u8>,
    message: Vec<u8>,
    digest: Vec<u8>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let out = Command::new(tsa_bin())
            .args(["init", "--hsm", "--algorithm", "p256", "--dir"])
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", tsa_bin()));
        assert!(
            out.status.success(),
            "tsa init --hsm failed (is SoftHSM2 installed? scripts/test.sh installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut config =
            Config::load(&dir.path().join("tsa.toml")).expect("the init configuration");
        let SignerConfig::Pkcs11(pkcs11) = &mut config.signer else {
            panic!("tsa init --hsm writes a pkcs11 signer");
        };
        // A session per thread of the throughput table, whatever the thread counts.
        pkcs11.sessions = 16;
        let pkcs11 = (**pkcs11).clone();
        pkcs11.apply_module_env();

        // The raw side first: it initializes the library; the TSA's signers share it.
        let module = Module::load(&pkcs11.module).expect("the SoftHSM2 module");
        let tsa = server::build(&config).expect("server::build with the HSM key");
        let signer = Pkcs11Signer::open(&pkcs11).expect("the PKCS#11 signer");

        let data = b"what openssl ts -query -data FILE -sha256 -cert would stamp";
        let query = Query::for_data(DigestAlgorithm::Sha256, data).expect("a query");
        let request = query.to_der().expect("the request DER");
        let reply = tsa.issue(&request).expect("the TSA grants the request");
        let response = Response::from_der(&reply).expect("a TimeStampResp");
        assert!(response.granted(), "not granted");
        let token = response.token.expect("a token");
        let message = token
            .signed_data
            .signer_infos
            .0
            .get(0)
            .map(|si| der::Encode::to_der(si.signed_attrs.as_ref().unwrap()).unwrap())
            .expect("signed attributes");
        let digest = DigestAlgorithm::Sha256.digest(&message).unwrap();
        Fixture {
            dir,
            pkcs11,
            module,
            tsa,
            signer,
            request,
            message,
            digest,
        }
    }
}

/// A logged-in session of the raw side and the key's handle in it. (SoftHSM2 forgets the
/// handles of private objects when the application's last session closes: find it per session.)
fn raw_session(module: &Module, pkcs11: &Pkcs11Config) -> (Session, ObjectHandle) {
    let slot = pool::find_slot(module.ctx(), &pkcs11.token_selector()).expect("the token");
    let session = pool::open_logged_in(module.ctx(), slot, &pkcs11.pin_source().unwrap(), false)
        .expect("a logged-in session");
    let key = tsa::signer::pkcs11::key::find_private_key(&session, &pkcs11.key_selector().unwrap())
        .expect("the key");
    (session, key)
}

/// Runs `work` on `threads` threads for `secs` seconds; operations per second.
fn rate<S>(
    threads: usize,
    secs: f64,
    setup: impl Fn() -> S + Sync,
    work: impl Fn(&S) + Sync,
) -> f64 {
    let stop = AtomicBool::new(false);
    let count = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let state = setup();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    work(&state);
                    n += 1;
                }
                count.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
    });
    count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// `processes` concurrent `tsa hsm check --signatures n`: the summed rate.
fn process_rate(config: &Path, processes: usize, signatures: usize) -> f64 {
    let rates: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..processes)
            .map(|_| {
                scope.spawn(|| {
                    let out = Command::new(tsa_bin())
                        .args([
                            "hsm",
                            "check",
                            "--signatures",
                            &signatures.to_string(),
                            "--config",
                        ])
                        .arg(config)
                        .env("RUST_LOG", "error")
                        .output()
                        .expect("tsa hsm check");
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    text.lines()
                        .find(|l| l.starts_with("rate:"))
                        .and_then(|l| l.rsplit("= ").next())
                        .and_then(|r| r.trim_end_matches("/s").parse::<f64>().ok())
                        .unwrap_or_else(|| panic!("no rate in {text}"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    rates.iter().sum()
}

fn throughput(f: &Fixture) {
    let secs = 3.0;
    let counts: Vec<usize> = std::env::var("HSM_BENCH_THREADS")
        .unwrap_or_else(|_| "1 2".into())
        .split_whitespace()
        .map(|n| n.parse().expect("HSM_BENCH_THREADS: numbers"))
        .collect();
    let raw = |threads| {
        rate(
            threads,
            secs,
            || raw_session(&f.module, &f.pkcs11),
            |(session, key)| {
                session
                    .sign(&Mechanism::Ecdsa, *key, &f.digest)
                    .expect("raw sign");
            },
        )
    };
    let issue = |threads| {
        rate(
            threads,
            secs,
            || (),
            |_| {
                f.tsa.issue(&f.request).expect("granted");
            },
        )
    };
    let config = f.dir.path().join("tsa.toml");
    let mut rows = Vec::new();
    for &n in &counts {
        rows.push((format!("raw cryptoki C_Sign, {n} thread(s)"), raw(n)));
    }
    for &n in &counts {
        rows.push((
            format!("Tsa::issue (pkcs11 signer), {n} thread(s)"),
            issue(n),
        ));
    }
    for &n in &counts {
        rows.push((
            format!("tsa hsm check (signer), {n} process(es)"),
            process_rate(&config, n, 50_000),
        ));
    }
    let raw1 = rows[0].1;
    println!();
    println!(
        "Throughput on this machine ({} CPUs), SoftHSM2 P-256, about {secs} s per cell:",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{:<44} {:>10} {:>16}", "", "per second", "of raw, 1 thread");
    for (name, r) in rows {
        println!("{name:<44} {r:>10.0} {:>15.1}%", 100.0 * r / raw1);
    }
}

fn summary(f: &Fixture) {
    let median = |bench: &str| -> Option<f64> {
        // Where criterion 0.5 writes (CRITERION_HOME, else target/criterion).
        let path = std::env::var_os("CRITERION_HOME")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/criterion"))
            .join(GROUP)
            .join(bench)
            .join("new/estimates.json");
        let text = std::fs::read_to_string(path).ok()?;
        let median = &text[text.find("\"median\"")?..];
        let value = &median[median.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
        value[..value.find([',', '}'])?].trim().parse().ok()
    };
    let (raw, sign, issue) = (
        median("1_raw_cryptoki_sign"),
        median("2_signer_sign"),
        median("3_issue"),
    );
    println!();
    println!("Summary (criterion medians, one thread):");
    for (name, ns) in [
        ("raw cryptoki sign", raw),
        ("Pkcs11Signer::sign", sign),
        ("Tsa::issue", issue),
    ] {
        if let Some(ns) = ns {
            let pct = raw.map_or(String::new(), |r| {
                format!("  {:.1}% of the raw rate", 100.0 * r / ns)
            });
            println!(
                "  {name:<20} {:>8.1} µs  {:>8.0}/s{pct}",
                ns / 1e3,
                1e9 / ns
            );
        }
    }
    let _ = &f.message;
}

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let f = Fixture::new();
    let (session, key) = raw_session(&f.module, &f.pkcs11);
    let mechanism = Mechanism::Ecdsa;
    let mut group = criterion.benchmark_group(GROUP);
    group.bench_function("1_raw_cryptoki_sign", |b| {
        b.iter(|| {
            session
                .sign(&mechanism, key, black_box(&f.digest))
                .expect("raw sign")
        })
    });
    group.bench_function("2_signer_sign", |b| {
        b.iter(|| f.signer.sign(black_box(&f.message)).expect("sign"))
    });
    group.bench_function("3_issue", |b| {
        b.iter(|| f.tsa.issue(black_box(&f.request)).expect("granted"))
    });
    group.finish();
    criterion.final_summary();
    drop(session);
    if benchmarking {
        summary(&f);
        throughput(&f);
    }
}
