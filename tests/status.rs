//! The operator's status page (`GET /status` on the admin listener), rendered by a real
//! browser: the real server on a disciplined clock fed by in-process NTP servers (one of them
//! a falseticker), some requests, then headless Chromium dumps the DOM and takes a screenshot.

#[path = "common/clock.rs"]
mod clock;
mod common;
#[path = "common/ntp.rs"]
mod ntp;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clock::{query, ready, stamp, tsa_disciplined, wait_for};
use common::{curl_post, ok, run};
use ntp::{Behaviour, NtpServer};

fn chromium() -> &'static str {
    for name in ["chromium", "chromium-browser"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return name;
        }
    }
    panic!("chromium is not installed (scripts/test.sh installs it)");
}

/// Headless Chromium with `args`, bounded in time, with a throw-away profile.
fn headless(args: &[&str], profile: &Path) -> std::process::Output {
    let out = run(Command::new("timeout")
        .args(["-k", "5", "90", chromium()])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--mute-audio",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .env("HOME", profile));
    assert!(
        out.status.success(),
        "chromium {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG ({} bytes)",
        png.len()
    );
    assert_eq!(&png[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (be(&png[16..20]), be(&png[20..24]))
}

/// The text of the element with this id (up to its closing tag).
fn element<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let start = dom[..start].rfind('<').unwrap();
    let tag: String = dom[start + 1..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let end = dom[start..]
        .find(&format!("</{tag}>"))
        .unwrap_or_else(|| panic!("#{id} is not closed"));
    &dom[start..start + end]
}

fn subject_cn(server: &common::Server) -> String {
    let pem = server.path("tsa-cert.pem");
    let out = ok(Command::new("openssl").args([
        "x509",
        "-noout",
        "-subject",
        "-nameopt",
        "RFC2253",
        "-in",
        pem.to_str().unwrap(),
    ]));
    let subject = String::from_utf8(out.stdout).unwrap();
    subject
        .trim()
        .split(',')
        .find_map(|rdn| rdn.trim_start_matches("subject=").strip_prefix("CN="))
        .expect("a CN")
        .to_string()
}

#[test]
fn status_page_in_headless_chromium() {
    let servers: Vec<NtpServer> = (0..3)
        .map(|_| NtpServer::start(Behaviour::default()))
        .collect();
    // A fourth server 300 ms off: outside the majority's intersection.
    let falseticker = NtpServer::start(Behaviour {
        offset_ns: 300_000_000,
        ..Behaviour::default()
    });
    let mut addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    addrs.push(falseticker.addr);
    let tsa = tsa_disciplined(&addrs, "");
    wait_for(|| ready(&tsa), "synchronization", Duration::from_secs(15));

    // A few seconds of traffic: tokens and rejections, for the rate plot and the counters.
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    let junk = work.path().join("junk.bin");
    std::fs::write(&junk, [0x30, 0x03, 0x02, 0x01, 0x07]).unwrap();
    let mut granted = 0;
    for round in 0..10 {
        for _ in 0..(2 + round % 3) {
            let (reply, _, _) = stamp(&tsa, work.path());
            assert!(reply.granted(), "a token");
            granted += 1;
        }
        if round % 2 == 0 {
            let (status, _, _) = curl_post(&tsa.url, &junk, "application/timestamp-query");
            assert_eq!(status, 200);
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    // The falseticker is rejected by now (the discipline runs every update interval).
    wait_for(
        || {
            clock::clock_report(&tsa)
                .lines()
                .any(|l| l.contains(&falseticker.addr.to_string()) && l.contains("falseticker"))
        },
        "the falseticker",
        Duration::from_secs(10),
    );

    // The page itself: HTML, no script, no external asset.
    let out = ok(Command::new("curl").args([
        "-sS",
        "--max-time",
        "10",
        "-D",
        "-",
        &format!("{}/status", tsa.admin_url),
    ]));
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let head_lower = head.to_ascii_lowercase();
    assert!(
        head_lower.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    // The operator's page: never sniffed as another type, never kept by a cache.
    assert!(
        head_lower.contains("x-content-type-options: nosniff")
            && head_lower.contains("cache-control: no-store"),
        "{head}"
    );
    assert!(body.starts_with("<!DOCTYPE html>"));
    assert!(!body.contains("<script"));
    assert!(!body.contains(" src="));

    let profile = tempfile::tempdir().unwrap();
    let url = format!("{}/status", tsa.admin_url);
    let dom = headless(&["--dump-dom", &url], profile.path());
    let dom = String::from_utf8(dom.stdout).unwrap();

    // The clock's state in the header.
    let state = element(&dom, "clock-state");
    assert!(state.ends_with(">synchronized"), "{state}");
    assert!(element(&dom, "issuing").contains("issuing time-stamps"));
    assert!(element(&dom, "clock-bound").contains('s'));

    // The sources with their selections.
    let sources = element(&dom, "sources");
    for s in &servers {
        let row = format!("data-source=\"ntp {}\" data-selection=\"selected\"", s.addr);
        assert!(sources.contains(&row), "{row} in {sources}");
    }
    let row = format!(
        "data-source=\"ntp {}\" data-selection=\"falseticker\"",
        falseticker.addr
    );
    assert!(sources.contains(&row), "{row} in {sources}");
    assert_eq!(sources.matches("<tr data-source=").count(), 4);

    // The plots: SVG polylines with several points, and a UTC time axis.
    for id in ["plot-offset", "plot-bound", "plot-rates"] {
        let svg = element(&dom, id);
        let points = svg
            .split("points=\"")
            .nth(1)
            .unwrap_or_else(|| panic!("no polyline in #{id}: {svg}"));
        let points = &points[..points.find('"').unwrap()];
        assert!(points.split(' ').count() >= 3, "#{id}: {points}");
        assert!(svg.contains(">UTC</text>"), "#{id}");
    }

    // Recent events, with their UTC time.
    let events = element(&dom, "events");
    assert!(events.contains("data-event=\"sync_acquired\""), "{events}");
    assert!(
        events.contains("data-event=\"source_rejected\""),
        "{events}"
    );
    let year = chrono_year();
    assert!(
        events.contains(&format!("<td class=\"mono\">{year}-")),
        "{events}"
    );

    // Signer and certificate.
    let cn = subject_cn(&tsa);
    assert!(
        element(&dom, "certificate-subject").contains(&cn),
        "{cn} in the subject"
    );
    assert!(element(&dom, "certificate-days").contains("days left"));
    let tokens: u64 = element(&dom, "tokens-total")
        .rsplit('>')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        tokens >= granted,
        "{tokens} tokens shown, {granted} granted"
    );
    let rejected: u64 = element(&dom, "rejections-total")
        .rsplit('>')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rejected >= 5, "{rejected} rejections shown");

    // The screenshot: a PNG of the window's size, kept for a look.
    let shot = screenshot_path();
    let _ = std::fs::remove_file(&shot);
    headless(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,2000",
            &url,
        ],
        profile.path(),
    );
    let png = std::fs::read(&shot).expect("the screenshot");
    let (w, h) = png_size(&png);
    assert!(
        (1000..=1400).contains(&w) && (1500..=2200).contains(&h),
        "{w}×{h}"
    );
    assert!(
        (20_000..20_000_000).contains(&png.len()),
        "{} bytes",
        png.len()
    );
    eprintln!("status page screenshot: {}", shot.display());
}

fn chrono_year() -> String {
    let out = ok(Command::new("date").args(["-u", "+%Y"]));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png")
}
