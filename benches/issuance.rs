//! What one token costs, and how much of it is the signature.
//!
//! For each signing algorithm (ECDSA P-256, P-384, RSA-2048 PKCS#1 v1.5, RSA-2048 PSS) one
//! criterion group `issuance-<alg>` measures:
//!
//! - `1_raw_sign`: `SoftwareSigner::sign` of the TSU key over real signed attributes (the
//!   exact octets an issuance signs), i.e. the floor of what a token can cost;
//! - `2_issue`: one whole `Tsa::issue(&request_der)` on a `Tsa` from `tsa::server::build`:
//!   parse + serial + clock + build + sign + assemble;
//! - `3_parse_request`: `protocol::parse_request` alone;
//! - `4_build_assemble`: `TokenTemplate::to_be_signed` + `TokenTemplate::assemble` with a
//!   precomputed signature, no signing;
//! - `5_issue_unsigned`: everything `issue` does except the signature (parse, serial, clock,
//!   build, assemble), on the same components as the server.
//!
//! The PKI is the `tsa` binary's own: each group runs `tsa init --dir <tempdir> --algorithm …`
//! once at set-up, through `CARGO_BIN_EXE_tsa`, which cargo sets for benches and builds in the
//! same profile, so `cargo bench` needs nothing built beforehand. The request is what
//! `openssl ts -query -sha256 -cert` sends: a SHA-256 imprint, a 64-bit nonce, certReq TRUE.
//! Each issued token is verified once (signature, chain, imprint, nonce) before it is timed.
//!
//! After criterion's own output, a summary table reads criterion's estimates (median) back
//! and prints `issue / raw sign` and the rest as ratios. On a busy machine the two medians are
//! taken seconds apart under different load, so the table also gives
//! `1 + unsigned / raw sign`: the same ratio from the part of `issue` that is not signing.
//!
//! ```sh
//! cargo bench --bench issuance                       # all groups, a few minutes
//! cargo bench --bench issuance -- issuance-p256      # one algorithm
//! cargo bench --bench issuance -- --measurement-time 10 --sample-size 100
//! ```
//!
//! Under `cargo test --all-targets` the same binary runs each benchmark once (criterion's
//! test mode) as a smoke test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use criterion::{black_box, Criterion};
use der::Decode;
use tempfile::TempDir;
use x509_cert::Certificate;

use tsa::alg::DigestAlgorithm;
use tsa::archive::serial::{RandomSerials, SerialAllocator};
use tsa::client::read::Response;
use tsa::client::verify::{verify, Expectation};
use tsa::client::Query;
use tsa::clock::development::DevelopmentClock;
use tsa::clock::IssuingClock;
use tsa::config::Config;
use tsa::protocol::{self, RequestRules, Stamp, TemplateOptions, TokenTemplate};
use tsa::server::{self, Tsa};
use tsa::signer::certificate::read_pem_certificates;
use tsa::signer::software::{RsaPadding, SoftwareSigner};
use tsa::signer::Signer;

const TSA_BIN: &str = env!("CARGO_BIN_EXE_tsa");

/// The algorithms measured: group name and `tsa init` arguments.
const ALGORITHMS: [(&str, &[&str]); 4] = [
    ("p256", &["--algorithm", "p256"]),
    ("p384", &["--algorithm", "p384"]),
    ("rsa2048-pkcs1", &["--algorithm", "rsa2048"]),
    ("rsa2048-pss", &["--algorithm", "rsa2048", "--pss"]),
];

const BENCHES: [&str; 5] = [
    "1_raw_sign",
    "2_issue",
    "3_parse_request",
    "4_build_assemble",
    "5_issue_unsigned",
];

/// Everything one group needs, built once.
struct Fixture {
    name: &'static str,
    /// Keeps the PKI alive for as long as the fixture.
    _dir: TempDir,
    tsa: Tsa,
    signer: SoftwareSigner,
    request: Vec<u8>,
    rules: RequestRules,
    template: TokenTemplate,
    clock: IssuingClock,
    max_bound_ns: u64,
    serials: RandomSerials,
    /// The signed attributes of a real token: what `1_raw_sign` signs.
    message: Vec<u8>,
    /// A real signature, for assembling without signing.
    signature: Vec<u8>,
}

impl Fixture {
    fn new(name: &'static str, init_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let out = Command::new(TSA_BIN)
            .arg("init")
            .arg("--dir")
            .arg(dir.path())
            .args(init_args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {TSA_BIN}: {e}"));
        assert!(
            out.status.success(),
            "tsa init {init_args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let config = Config::load(&dir.path().join("tsa.toml")).expect("the init configuration");
        let tsa = server::build(&config).expect("server::build");
        // The key and padding `tsa init` wrote into that configuration (read from the files, so
        // that this does not depend on the shape of `SignerConfig`).
        let padding = if init_args.contains(&"--pss") {
            RsaPadding::Pss
        } else {
            RsaPadding::Pkcs1
        };
        let signer =
            SoftwareSigner::load(&dir.path().join("tsa-key.pem"), padding).expect("the TSU key");
        tsa.certificate()
            .check(&signer, Some(SystemTime::now()))
            .expect("the key is the TSU certificate's");

        // The rules `server::build` makes from a development-clock configuration: the
        // development policy and no other.
        let rules = RequestRules {
            accepted_digests: config.digests().expect("digests"),
            default_policy: tsa::alg::oid::DEVELOPMENT_POLICY,
            other_policies: vec![],
            max_len: config.server.max_request_bytes,
        };
        let certificate = tsa.certificate();
        let template = TokenTemplate::new(
            certificate.der(),
            certificate.chain(),
            signer.algorithm(),
            TemplateOptions {
                include_tsa_name: config.token.include_tsa_name,
                ess_cert_id_v1: config.token.ess_cert_id_v1,
                precision: config.token.precision,
            },
        )
        .expect("the token template");
        let max_bound = Duration::from_millis(config.clock.max_accuracy_ms);
        let clock = IssuingClock::new(
            Box::new(DevelopmentClock::new(Duration::from_millis(
                config.clock.development_accuracy_ms,
            ))),
            max_bound,
            // The tick `server::build` gives the clock.
            Duration::from_nanos(config.token.precision.unit_ns().min(1_000)),
        );

        let data = b"what openssl ts -query -data FILE -sha256 -cert would stamp";
        let query = Query::for_data(DigestAlgorithm::Sha256, data).expect("a query");
        let request = query.to_der().expect("the request DER");

        // One real issuance, verified, so that what is timed is a working path.
        let reply = tsa.issue(&request).expect("the TSA grants the request");
        let response = Response::from_der(&reply).expect("a TimeStampResp");
        assert!(response.granted(), "{name}: not granted");
        let ca = read_pem_certificates(&dir.path().join("ca-cert.pem")).expect("the CA");
        let expect = Expectation {
            data: Some(data),
            query: Some(&request),
            trusted: ca
                .iter()
                .map(|der| Certificate::from_der(der).expect("the CA certificate"))
                .collect(),
            ..Expectation::default()
        };
        verify(response.token.as_ref().expect("a token"), &expect)
            .unwrap_or_else(|e| panic!("{name}: the issued token does not verify: {e:#}"));

        let parsed = protocol::parse_request(&request, &rules).expect("the request parses");
        let serial = serials_next(&RandomSerials::new());
        let stamp = Stamp::new(
            tsa::clock::system_unix_ns(),
            0,
            template.precision(),
            serial,
        );
        let tbs = template
            .to_be_signed(&parsed, &stamp)
            .expect("to_be_signed");
        let message = tbs.message().to_vec();
        let signature = signer.sign(&message).expect("a signature");

        Fixture {
            name,
            _dir: dir,
            tsa,
            signer,
            request,
            rules,
            template,
            clock,
            max_bound_ns: max_bound.as_nanos() as u64,
            serials: RandomSerials::new(),
            message,
            signature,
        }
    }

    /// `Tsa::issue` without the signature, on equivalent components.
    fn issue_unsigned(&self) -> Vec<u8> {
        let request = protocol::parse_request(&self.request, &self.rules).expect("parses");
        let serial = serials_next(&self.serials);
        let time = self.clock.now().expect("the development clock");
        let stamp = Stamp::new(
            time.unix_ns,
            time.bound_ns,
            self.template.precision(),
            serial,
        );
        assert!(stamp.accuracy.as_ns() <= self.max_bound_ns);
        let tbs = self.template.to_be_signed(&request, &stamp).expect("tbs");
        self.template.assemble(&tbs, &self.signature)
    }
}

fn serials_next(serials: &RandomSerials) -> tsa::protocol::Serial {
    serials.next().expect("a serial")
}

fn bench_algorithm(c: &mut Criterion, f: &Fixture) {
    let mut group = c.benchmark_group(format!("issuance-{}", f.name));

    group.bench_function(BENCHES[0], |b| {
        b.iter(|| f.signer.sign(black_box(&f.message)).expect("sign"))
    });
    group.bench_function(BENCHES[1], |b| {
        b.iter(|| f.tsa.issue(black_box(&f.request)).expect("granted"))
    });
    group.bench_function(BENCHES[2], |b| {
        b.iter(|| {
            protocol::parse_request(black_box(&f.request), &f.rules)
                .expect("parses")
                .cert_req
        })
    });
    // A fixed stamp: the clock and the serial are not part of this measurement.
    let parsed = protocol::parse_request(&f.request, &f.rules).expect("parses");
    let stamp = Stamp::new(
        tsa::clock::system_unix_ns(),
        1_000_000,
        f.template.precision(),
        serials_next(&f.serials),
    );
    group.bench_function(BENCHES[3], |b| {
        b.iter(|| {
            let tbs = f
                .template
                .to_be_signed(black_box(&parsed), black_box(&stamp))
                .expect("tbs");
            f.template.assemble(&tbs, black_box(&f.signature))
        })
    });
    group.bench_function(BENCHES[4], |b| b.iter(|| f.issue_unsigned()));
    group.finish();
}

/// Where criterion writes its estimates (as criterion 0.5 decides it).
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/criterion")
}

/// The median point estimate (ns) of one benchmark, if criterion wrote it during this run.
fn median_ns(group: &str, bench: &str, since: SystemTime) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(bench)
        .join("new/estimates.json");
    let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
    if modified < since {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    // {"mean":{…},"median":{"confidence_interval":{…},"point_estimate":N,…},…}
    let median = &text[text.find("\"median\"")?..];
    let value = &median[median.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = value.find([',', '}'])?;
    value[..end].trim().parse().ok()
}

fn summary(since: SystemTime) {
    let us = |ns: Option<f64>| ns.map_or("-".into(), |ns| format!("{:.1}", ns / 1e3));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
        _ => "-".into(),
    };
    println!();
    println!("Summary (criterion medians, µs; ratios to the raw signature):");
    println!(
        "(issue/sign compares two runs taken seconds apart and moves with the machine's load; \
         1+unsig/sign, from the part of issue that is not signing, is the steadier estimate)"
    );
    println!(
        "{:<15} {:>9} {:>9} {:>11} {:>8} {:>10} {:>9} {:>14} {:>13}",
        "algorithm",
        "raw sign",
        "issue",
        "issue/sign",
        "parse",
        "build+asm",
        "unsigned",
        "unsigned/sign",
        "1+unsig/sign"
    );
    for (name, _) in ALGORITHMS {
        let group = format!("issuance-{name}");
        let [sign, issue, parse, build, unsigned] = BENCHES.map(|b| median_ns(&group, b, since));
        if sign.is_none() && issue.is_none() {
            continue;
        }
        println!(
            "{:<15} {:>9} {:>9} {:>11} {:>8} {:>10} {:>9} {:>14} {:>13}",
            name,
            us(sign),
            us(issue),
            ratio(issue, sign),
            us(parse),
            us(build),
            us(unsigned),
            ratio(unsigned, sign),
            ratio(sign.zip(unsigned).map(|(s, u)| s + u), sign)
        );
    }
}

fn main() {
    let started = SystemTime::now();
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let fixtures: Vec<Fixture> = ALGORITHMS
        .iter()
        .map(|(name, args)| Fixture::new(name, args))
        .collect();
    for fixture in &fixtures {
        bench_algorithm(&mut criterion, fixture);
    }
    criterion.final_summary();
    if benchmarking {
        summary(started);
    }
}
