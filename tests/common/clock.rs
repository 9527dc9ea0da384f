//! Helpers for tests of the disciplined clock through the real server.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::{curl_post, openssl, Server};
use tsa::client::read::Response;

/// A TSA on a disciplined clock fed by NTP `servers`, polling every 200 ms; `extra` adds or
/// overrides `[clock]` settings.
pub fn tsa_disciplined(servers: &[SocketAddr], extra: &str) -> Server {
    tsa_disciplined_init(&[], servers, extra)
}

/// [`tsa_disciplined`] with further `tsa init` arguments (such as `--archive`).
pub fn tsa_disciplined_init(init_args: &[&str], servers: &[SocketAddr], extra: &str) -> Server {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    let mut clock = format!(
        "[clock]\nsource = \"disciplined\"\nntp_servers = [{}]\n",
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
    // Clock keys first (no header needed), then any further sections.
    clock.push_str(extra);
    // A production policy: the development policy belongs to the development clock only.
    let policy = "[policy]\ndefault = \"0.4.0.2023.1.1\"\n";
    let server = Server::start(init_args, "");
    let path = server.path("tsa.toml");
    let config = std::fs::read_to_string(&path).unwrap();
    let config = config.replace("source = \"development\"\n", "");
    std::fs::write(
        &path,
        crate::common::merge_toml(&config, &format!("{policy}{clock}")),
    )
    .unwrap();
    let dir = server.into_dir();
    Server::serve(dir)
}

pub fn query(work: &Path) {
    std::fs::write(work.join("data.bin"), b"invoice 42").unwrap();
    openssl(
        &[
            "ts", "-query", "-data", "data.bin", "-sha256", "-cert", "-out", "req.tsq",
        ],
        work,
    );
}

/// One request; returns the decoded reply and the client's send/receive window (Unix ns).
pub fn stamp(server: &Server, work: &Path) -> (Response, u64, u64) {
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

pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

pub fn wait_for(mut f: impl FnMut() -> bool, what: &str, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

pub fn ready(server: &Server) -> bool {
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
pub fn count(report: &str, selection: &str) -> usize {
    report
        .lines()
        .filter(|l| l.starts_with("ntp ") && l.split_whitespace().nth(3) == Some(selection))
        .count()
}

pub fn clock_report(server: &Server) -> String {
    let out = crate::common::ok(std::process::Command::new(crate::common::TSA).args([
        "clock",
        "--admin",
        &server.admin_url,
    ]));
    String::from_utf8(out.stdout).unwrap()
}
