//! The disciplined clock end to end: the real server, in-process NTP servers on loopback with
//! scripted behaviour, real HTTP and the real `openssl ts` client.

mod common;
#[path = "common/ntp.rs"]
mod ntp;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{curl_post, openssl, Server};
use ntp::{Behaviour, NtpServer};
use tsa::client::read::Response;
use tsa::protocol::FailInfo;

/// A TSA on a disciplined clock fed by `servers`, polling every 200 ms.
fn tsa_with(servers: &[NtpServer], extra: &str) -> Server {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    let mut clock = format!(
        "[clock]\nsource = \"disciplined\"\nntp_servers = [{}]\n{extra}",
        list.join(", ")
    );
    for default in [
        "poll_interval_ms = 200",
        "ntp_timeout_ms = 150",
        "step_confirm_rounds = 4",
    ] {
        let key = default.split(' ').next().unwrap();
        if !extra.contains(key) {
            clock.push_str(default);
            clock.push('\n');
        }
    }
    // A production policy: the development policy belongs to the development clock only.
    let policy = "[policy]\ndefault = \"0.4.0.2023.1.1\"\n";
    let server = Server::start(&[], "");
    let path = server.path("tsa.toml");
    let config = std::fs::read_to_string(&path).unwrap();
    let config = config.replace("source = \"development\"\n", "");
    std::fs::write(
        &path,
        common::merge_toml(&config, &format!("{policy}{clock}")),
    )
    .unwrap();
    let dir = server.into_dir();
    Server::serve(dir)
}

fn query(work: &Path) {
    std::fs::write(work.join("data.bin"), b"invoice 42").unwrap();
    openssl(
        &[
            "ts", "-query", "-data", "data.bin", "-sha256", "-cert", "-out", "req.tsq",
        ],
        work,
    );
}

/// One request; returns the decoded reply and the client's send/receive window (Unix ns).
fn stamp(server: &Server, work: &Path) -> (Response, u64, u64) {
    let sent = unix_ns();
    let (status, _, body) = curl_post(
        &server.url,
        &work.join("req.tsq"),
        "application/timestamp-query",
    );
    let received = unix_ns();
    assert_eq!(status, 200);
    (Response::from_der(&body).unwrap(), sent, received)
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn wait_for(mut f: impl FnMut() -> bool, what: &str, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

fn ready(server: &Server) -> bool {
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{}/health/ready", server.admin_url),
        ])
        .output()
        .unwrap();
    out.stdout == b"200"
}

/// Sources in the report's table with this selection.
fn count(report: &str, selection: &str) -> usize {
    report
        .lines()
        .filter(|l| l.starts_with("ntp ") && l.split_whitespace().nth(3) == Some(selection))
        .count()
}

fn clock_report(server: &Server) -> String {
    let out = common::ok(std::process::Command::new(common::TSA).args([
        "clock",
        "--admin",
        &server.admin_url,
    ]));
    String::from_utf8(out.stdout).unwrap()
}

/// The references say the time is 5 s later than this machine's clock: the TSA follows them,
/// and genTime ± accuracy holds the references' time of the exchange.
#[test]
fn follows_the_references_not_the_system_clock() {
    let offset = 5_000_000_000i64;
    let servers: Vec<NtpServer> = (0..5)
        .map(|_| {
            NtpServer::start(Behaviour {
                offset_ns: offset,
                ..Default::default()
            })
        })
        .collect();
    let server = tsa_with(&servers, "");
    wait_for(
        || ready(&server),
        "synchronization",
        Duration::from_secs(10),
    );
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    for _ in 0..5 {
        let (response, sent, received) = stamp(&server, work.path());
        assert!(response.granted(), "{:?}", response.status_text);
        let token = response.token.unwrap();
        let tst = token.tst_info();
        let gen = tst.gen_time.unix_ns() as i64;
        let accuracy = tst.accuracy.unwrap().as_ns() as i64;
        assert!(accuracy < 50_000_000, "accuracy {accuracy} ns on loopback");
        let (lo, hi) = (sent as i64 + offset, received as i64 + offset);
        assert!(
            gen + accuracy >= lo && gen - accuracy <= hi,
            "genTime {gen} ± {accuracy} outside [{lo}, {hi}]"
        );
        assert_eq!(tst.policy.to_string(), "0.4.0.2023.1.1");
    }
    let report = clock_report(&server);
    assert!(report.contains("State       : synchronized"), "{report}");
    assert_eq!(count(&report, "selected"), 5, "{report}");
}

#[test]
fn falsetickers_are_rejected_and_tokens_keep_the_true_time() {
    let mut servers: Vec<NtpServer> = (0..3)
        .map(|_| NtpServer::start(Behaviour::default()))
        .collect();
    servers.push(NtpServer::start(Behaviour {
        offset_ns: 3_000_000_000,
        ..Default::default()
    }));
    servers.push(NtpServer::start(Behaviour {
        offset_ns: -3_000_000_000,
        ..Default::default()
    }));
    let server = tsa_with(&servers, "");
    wait_for(
        || ready(&server),
        "synchronization",
        Duration::from_secs(10),
    );
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    let (response, sent, received) = stamp(&server, work.path());
    let tst = response.token.as_ref().unwrap().tst_info();
    let (gen, accuracy) = (tst.gen_time.unix_ns(), tst.accuracy.unwrap().as_ns());
    assert!(gen + accuracy >= sent && gen - accuracy <= received);
    wait_for(
        || count(&clock_report(&server), "falseticker") == 2,
        "two falsetickers",
        Duration::from_secs(5),
    );
}

/// Three of five servers step by +2 s together: no token carries the stepped time until the
/// step persisted for the confirmation rounds; requests meanwhile get timeNotAvailable.
#[test]
fn a_majority_step_stops_issuance_until_confirmed() {
    let servers: Vec<NtpServer> = (0..5)
        .map(|_| NtpServer::start(Behaviour::default()))
        .collect();
    // Slow the confirmation down so that the refusal is easy to observe: 10 rounds of 200 ms.
    let server = tsa_with(&servers, "step_confirm_rounds = 10\n");
    wait_for(
        || ready(&server),
        "synchronization",
        Duration::from_secs(10),
    );
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    assert!(stamp(&server, work.path()).0.granted());

    for s in &servers[..3] {
        s.set(|b| b.offset_ns = 2_000_000_000);
    }
    let step_at = Instant::now();
    let mut refused = 0;
    let mut stepped = false;
    while step_at.elapsed() < Duration::from_secs(8) && !stepped {
        let (response, sent, _) = stamp(&server, work.path());
        match &response.token {
            Some(token) => {
                let tst = token.tst_info();
                let ahead = tst.gen_time.unix_ns() as i64 - sent as i64;
                if ahead > 1_000_000_000 {
                    // The stepped time: only after the confirmation rounds (10 × 200 ms).
                    assert!(
                        step_at.elapsed() >= Duration::from_millis(1_600),
                        "followed after {:?}",
                        step_at.elapsed()
                    );
                    assert!(refused > 0, "a step was followed without any refusal");
                    stepped = true;
                } else {
                    assert!(ahead.abs() < 500_000_000, "genTime off by {ahead} ns");
                }
            }
            None => {
                assert_eq!(response.fail_info(), Some(FailInfo::TimeNotAvailable));
                refused += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(refused > 0, "the step never stopped issuance");
    assert!(stepped, "the persisting step was never followed");
}

/// Every server goes silent: holdover, with the bound growing (here at an exaggerated drift
/// rate, so that it passes the declared accuracy within seconds), then refusal.
#[test]
fn losing_every_source_ends_in_refusal_when_the_bound_passes_the_accuracy() {
    let servers: Vec<NtpServer> = (0..3)
        .map(|_| NtpServer::start(Behaviour::default()))
        .collect();
    let server = tsa_with(
        &servers,
        "max_drift_ppm = 200000.0\nmax_sample_age_ms = 400\n",
    );
    wait_for(
        || ready(&server),
        "synchronization",
        Duration::from_secs(10),
    );
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    assert!(stamp(&server, work.path()).0.granted());
    for s in &servers {
        s.set(|b| b.silent = true);
    }
    wait_for(
        || clock_report(&server).contains("State       : holdover"),
        "holdover",
        Duration::from_secs(5),
    );
    wait_for(
        || stamp(&server, work.path()).0.fail_info() == Some(FailInfo::TimeNotAvailable),
        "refusal once the bound passes 1 s",
        Duration::from_secs(15),
    );
    assert!(!ready(&server));
}

#[test]
fn unsynchronized_leap_indicator_and_kiss_of_death_make_sources_unusable() {
    let mut servers: Vec<NtpServer> = (0..3)
        .map(|_| NtpServer::start(Behaviour::default()))
        .collect();
    servers.push(NtpServer::start(Behaviour {
        leap: 3,
        ..Default::default()
    }));
    servers.push(NtpServer::start(Behaviour {
        kod: Some(*b"DENY"),
        ..Default::default()
    }));
    let server = tsa_with(&servers, "");
    wait_for(
        || ready(&server),
        "synchronization",
        Duration::from_secs(10),
    );
    // Three good sources of five usable... only three are usable: they are the majority.
    let report = clock_report(&server);
    assert_eq!(count(&report, "selected"), 3, "{report}");
    assert_eq!(count(&report, "unusable"), 2, "{report}");
    // DENY: polled once, never again.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        servers[4]
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert!(
        servers[3]
            .requests
            .load(std::sync::atomic::Ordering::SeqCst)
            > 1
    );
}
