//! `Type=notify` and the watchdog, with a notification socket of the test's own standing in
//! for systemd; and the unit files checked by `systemd-analyze verify`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn ready_status_and_watchdog_are_sent_to_the_notify_socket() {
    let sockets = tempfile::tempdir().unwrap();
    let path = sockets.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    common::ok(
        Command::new(common::TSA)
            .arg("init")
            .arg("--dir")
            .arg(dir.path()),
    );
    let _server = common::Server::serve_with_env(
        dir,
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "300000"),
        ],
    );

    let mut messages = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(3) {
        if let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let all = messages.join("\n");
    assert!(
        messages.first().is_some_and(|m| m.contains("READY=1")),
        "{all}"
    );
    assert!(all.contains("STATUS=clock synchronized"), "{all}");
    assert!(all.contains("issuing"), "{all}");
    // 150 ms between pings (half of WATCHDOG_USEC) over about 3 s.
    let pings = messages.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 10, "{pings} watchdog pings:\n{all}");
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        panic!("systemd-analyze is missing: scripts/test.sh installs systemd");
    };
    assert!(out.status.success());
    let root = env!("CARGO_MANIFEST_DIR");
    for unit in ["tsa.service", "tsa@.service"] {
        let path = format!("{root}/systemd/{unit}");
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no", "--recursive-errors=no"])
            .arg(&path)
            .env("SYSTEMD_LOG_LEVEL", "warning")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        // The binary path of the unit is not installed here; everything else must be clean.
        let problems: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("/usr/local/bin/tsa"))
            .collect();
        assert!(problems.is_empty(), "{unit}:\n{text}");

        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let verdict = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure level for {unit}:\n{text}"));
        assert!(
            ["PERFECT", "SAFE", "OK"]
                .iter()
                .any(|v| verdict.contains(v)),
            "{unit}: {verdict}"
        );
    }
}
