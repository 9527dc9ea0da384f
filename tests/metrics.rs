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
    assert!(value(&m, "tsa_certificate_expiry_seconds").unwrap() > 86_400.0);
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
    // Every request series is one of the bounded outcome/failInfo pairs.
    let series = m
        .lines()
        .filter(|l| l.starts_with("tsa_requests_total{"))
        .count();
    assert_eq!(series, 3, "{m}");
    assert_eq!(
        value(&m, r#"tsa_clock_refusals_total{reason="unsynchronized"}"#),
        Some(0.0)
    );
}
