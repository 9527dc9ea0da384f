//! Prometheus metrics on the admin listener, scraped from the real server after real
//! requests: counters by outcome and failInfo, the clock and its sources, bounded labels.

#[path = "common/clock.rs"]
mod clock;
mod common;
#[path = "common/ntp.rs"]
mod ntp;

use std::process::Command;
use std::time::Duration;

use clock::{query, ready, tsa_disciplined, wait_for};
use common::{curl_post, ok, openssl};
use ntp::{Behaviour, NtpServer};

fn scrape(admin_url: &str) -> String {
    let out = ok(Command::new("curl").args(["-sS", "-D", "-", &format!("{admin_url}/metrics")]));
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(
        body.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    body.to_string()
}

/// The value of the series `name{labels}` (labels as written, in order), if present.
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.parse().ok())
}

#[test]
fn counters_clock_and_sources_are_exported_with_bounded_labels() {
    let servers: Vec<NtpServer> = (0..3)
        .map(|_| NtpServer::start(Behaviour::default()))
        .collect();
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let tsa = tsa_disciplined(&addrs, "");
    wait_for(|| ready(&tsa), "synchronization", Duration::from_secs(10));
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    for _ in 0..2 {
        let (status, _, _) = curl_post(
            &tsa.url,
            &work.path().join("req.tsq"),
            "application/timestamp-query",
        );
        assert_eq!(status, 200);
    }
    openssl(
        &[
            "ts", "-query", "-data", "data.bin", "-sha1", "-out", "sha1.tsq",
        ],
        work.path(),
    );
    curl_post(
        &tsa.url,
        &work.path().join("sha1.tsq"),
        "application/timestamp-query",
    );
    // Fifty different malformed bodies: one series, not fifty.
    for i in 0..50u8 {
        let body = work.path().join("junk.bin");
        std::fs::write(&body, [0x30, 0x03, 0x02, 0x01, i]).unwrap();
        curl_post(&tsa.url, &body, "application/timestamp-query");
    }

    let m = scrape(&tsa.admin_url);
    assert_eq!(
        value(
            &m,
            r#"tsa_requests_total{outcome="granted",fail_info="none"}"#
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            r#"tsa_requests_total{outcome="rejected",fail_info="badAlg"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            r#"tsa_requests_total{outcome="rejected",fail_info="badDataFormat"}"#
        ),
        Some(50.0)
    );
    assert_eq!(value(&m, "tsa_tokens_issued_total"), Some(2.0));
    assert_eq!(value(&m, "tsa_request_duration_seconds_count"), Some(53.0));
    assert_eq!(value(&m, "tsa_signer_duration_seconds_count"), Some(2.0));
    assert_eq!(
        value(&m, r#"tsa_clock_state{state="synchronized"}"#),
        Some(1.0)
    );
    let bound = value(&m, "tsa_clock_error_bound_seconds").unwrap();
    assert!(bound > 0.0 && bound < 0.05, "bound {bound}");
    assert!(value(&m, "tsa_clock_offset_seconds").unwrap().abs() < 0.05);
    let expiry = value(&m, "tsa_certificate_expiry_seconds").unwrap();
    assert!(expiry > 86_400.0);
    let issuing = value(&m, "tsa_certificate_issuing_left_seconds").unwrap();
    assert!(issuing > 0.0 && issuing <= expiry, "{issuing} of {expiry}");
    for addr in &addrs {
        let source = format!("ntp {addr}");
        assert_eq!(
            value(
                &m,
                &format!(r#"tsa_clock_source_selection{{source="{source}",selection="selected"}}"#)
            ),
            Some(1.0),
            "{m}"
        );
        assert!(
            value(
                &m,
                &format!(r#"tsa_clock_source_reach{{source="{source}"}}"#)
            )
            .unwrap()
                > 0.0
        );
        assert!(value(
            &m,
            &format!(r#"tsa_clock_source_delay_seconds{{source="{source}"}}"#)
        )
        .is_some());
    }
    // The request series are exactly the bounded outcome/failInfo pairs, all present from
    // the start (granted, and rejected with each failInfo).
    let series = m
        .lines()
        .filter(|l| l.starts_with("tsa_requests_total{"))
        .count();
    assert_eq!(series, 1 + tsa::protocol::FailInfo::ALL.len(), "{m}");
    assert_eq!(
        value(&m, r#"tsa_clock_refusals_total{reason="unsynchronized"}"#),
        Some(0.0)
    );
}

/// While the clock is unsynchronized its bound is unbounded: the bound's series reads +Inf
/// (an alert on it fires; a series left out went quiet), and issuing stops
/// `min_certificate_validity_days` before the certificate's expiry.
#[test]
fn an_unbounded_clock_reads_as_an_infinite_bound() {
    // Nothing answers on the discard port.
    let silent: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let server = tsa_disciplined(
        &[silent],
        "min_agreeing = 1\n[token]\nmin_certificate_validity_days = 30\n",
    );
    let m = scrape(&server.admin_url);
    assert_eq!(
        value(&m, r#"tsa_clock_state{state="unsynchronized"}"#),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        value(&m, "tsa_clock_error_bound_seconds"),
        Some(f64::INFINITY),
        "{m}"
    );
    let expiry = value(&m, "tsa_certificate_expiry_seconds").unwrap();
    let issuing = value(&m, "tsa_certificate_issuing_left_seconds").unwrap();
    let gap = expiry - issuing - 30.0 * 86_400.0;
    assert!(gap.abs() < 60.0, "{issuing} against {expiry}");
}

/// Every string of `json` under one of `keys` (recursively), with the path that led there.
fn strings_under(
    json: &serde_json::Value,
    keys: &[&str],
    path: &str,
    out: &mut Vec<(String, String)>,
) {
    match json {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let here = format!("{path}.{k}");
                match v {
                    serde_json::Value::String(s) if keys.contains(&k.as_str()) => {
                        out.push((here, s.clone()))
                    }
                    _ => strings_under(v, keys, &here, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                strings_under(v, keys, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The metric names a PromQL expression refers to (every identifier starting with `tsa_`;
/// label values are quoted and label names never start so).
fn metric_names(expr: &str) -> Vec<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("tsa_"))
        .collect()
}

#[test]
fn grafana_dashboard_uses_only_metrics_the_server_exports() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    assert_eq!(
        dashboard["schemaVersion"].as_u64().map(|v| v >= 36),
        Some(true)
    );
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");

    // A real server, synchronized, with the archive, a granted and a rejected request: every
    // series exists.
    let servers: Vec<NtpServer> = (0..3)
        .map(|_| NtpServer::start(Behaviour::default()))
        .collect();
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let tsa = clock::tsa_disciplined_init(&["--archive"], &addrs, "");
    wait_for(|| ready(&tsa), "synchronization", Duration::from_secs(10));
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    let (status, _, _) = curl_post(
        &tsa.url,
        &work.path().join("req.tsq"),
        "application/timestamp-query",
    );
    assert_eq!(status, 200);
    let junk = work.path().join("junk.bin");
    std::fs::write(&junk, [0x30, 0x00]).unwrap();
    curl_post(&tsa.url, &junk, "application/timestamp-query");
    let scraped = scrape(&tsa.admin_url);
    let exported: std::collections::BTreeSet<&str> = scraped
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();

    let mut queries = Vec::new();
    strings_under(&dashboard, &["expr"], "", &mut queries);
    let mut variables = Vec::new();
    strings_under(
        &dashboard["templating"],
        &["query", "definition"],
        "templating",
        &mut variables,
    );
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let mut used = std::collections::BTreeSet::new();
    for (at, expr) in queries
        .iter()
        .chain(variables.iter().filter(|(_, q)| q.contains("tsa_")))
    {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{at}: {expr} names no tsa metric");
        for name in names {
            assert!(
                exported.contains(name),
                "{at}: {name} is not exported by the server\n{expr}\nexported: {exported:?}"
            );
            used.insert(name);
        }
        // Brackets and quotes are balanced.
        for (open, close) in [('(', ')'), ('{', '}'), ('[', ']')] {
            assert_eq!(
                expr.matches(open).count(),
                expr.matches(close).count(),
                "{at}: {expr}"
            );
        }
        assert_eq!(expr.matches('"').count() % 2, 0, "{at}: {expr}");
    }
    // What the dashboard is for: requests, latency, signer, certificate, clock and sources.
    for name in [
        "tsa_requests_total",
        "tsa_tokens_issued_total",
        "tsa_request_duration_seconds_bucket",
        "tsa_signer_duration_seconds_bucket",
        "tsa_signer_errors_total",
        "tsa_certificate_expiry_seconds",
        "tsa_clock_state",
        "tsa_clock_error_bound_seconds",
        "tsa_clock_declared_accuracy_seconds",
        "tsa_clock_offset_seconds",
        "tsa_clock_frequency_ppm",
        "tsa_clock_refusals_total",
        "tsa_clock_source_offset_seconds",
        "tsa_clock_source_delay_seconds",
        "tsa_clock_source_distance_seconds",
        "tsa_clock_source_reach",
        "tsa_clock_source_selection",
    ] {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }
}

#[test]
fn the_archive_reports_its_commits_and_queue() {
    let server = common::Server::start(&["--archive"], "");
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    let tokens = 12;
    for _ in 0..tokens {
        let (status, _, _) = curl_post(
            &server.url,
            &work.path().join("req.tsq"),
            "application/timestamp-query",
        );
        assert_eq!(status, 200);
    }
    let m = scrape(&server.admin_url);
    // Each token was committed before its reply left, so all are counted and none waits.
    assert_eq!(
        value(&m, "tsa_archive_commit_records_sum"),
        Some(f64::from(tokens)),
        "{m}"
    );
    // Commits of events alone (key loaded, clock state) count too.
    let commits = value(&m, "tsa_archive_commit_duration_seconds_count").unwrap();
    assert!(commits >= 1.0, "{m}");
    assert!(value(&m, "tsa_archive_commit_duration_seconds_sum").unwrap() > 0.0);
    assert_eq!(value(&m, "tsa_archive_queue_depth"), Some(0.0), "{m}");
    assert_eq!(value(&m, "tsa_queue_depth"), Some(0.0), "{m}");
    // A new archive is a token log, which indexes imprints as it commits: never behind. (With
    // rows, the imprint index, filled beside the writer, reaches every record within its
    // pause.)
    assert!(server.path("archive.tokens").is_dir(), "a token log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let m = scrape(&server.admin_url);
        match value(&m, "tsa_archive_imprint_index_behind") {
            Some(0.0) => break,
            Some(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            other => panic!("the imprint index is behind: {other:?}\n{m}"),
        }
    }
}
