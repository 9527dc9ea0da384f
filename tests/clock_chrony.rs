//! The disciplined clock against real `chronyd` servers on loopback, and (ignored by default,
//! run by scripts/compare-chrony.sh) the same scenarios through this clock and `chronyd -Q`.

#[path = "common/chrony.rs"]
mod chrony;
#[path = "common/clock.rs"]
mod clock;
mod common;
#[path = "common/ntp.rs"]
mod ntp;
#[path = "common/ports.rs"]
mod ports;

use std::time::Duration;

use chrony::{chronyd_query, Chronyd};
use clock::{clock_report, count, query, ready, stamp, tsa_disciplined, wait_for};
use ntp::{Behaviour, NtpServer};

#[test]
fn three_real_chronyd_servers_discipline_the_clock() {
    let servers: Vec<Chronyd> = (0..3).map(|_| Chronyd::start()).collect();
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let tsa = tsa_disciplined(&addrs, "");
    wait_for(
        || ready(&tsa),
        "synchronization on chronyd",
        Duration::from_secs(20),
    );
    let report = clock_report(&tsa);
    assert_eq!(count(&report, "selected"), 3, "{report}");
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    for _ in 0..3 {
        let (response, sent, received) = stamp(&tsa, work.path());
        let token = response.token.expect("granted");
        let tst = token.tst_info();
        let (gen, accuracy) = (tst.gen_time.unix_ns(), tst.accuracy.unwrap().as_ns());
        // chronyd serves this machine's clock: genTime ± accuracy holds the exchange's time.
        assert!(gen + accuracy >= sent && gen - accuracy <= received);
        assert!(
            accuracy < 20_000_000,
            "accuracy {accuracy} ns against loopback chronyd"
        );
    }
}

/// The offset this TSA's clock reports (UTC − local, seconds), from `tsa clock`.
fn tsa_offset(report: &str) -> Option<f64> {
    let line = report.lines().find(|l| l.starts_with("Offset"))?;
    line.split(':')
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn state(report: &str) -> String {
    report
        .lines()
        .find(|l| l.starts_with("State"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().split(' ').next().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// Side by side: the offset error of this clock and of `chronyd -Q` in loopback scenarios
/// with a known truth. Run with `scripts/compare-chrony.sh`.
#[test]
#[ignore]
fn compare_with_chronyd() {
    struct Scenario {
        name: &'static str,
        truth_s: f64,
        offsets_s: Vec<f64>,
    }
    let scenarios = [
        Scenario {
            name: "5 agreeing servers, clock 0.5 s behind",
            truth_s: 0.5,
            offsets_s: vec![0.5; 5],
        },
        Scenario {
            name: "3 good + 2 falsetickers (±3 s)",
            truth_s: 0.25,
            offsets_s: vec![0.25, 0.25, 0.25, 3.25, -2.75],
        },
        Scenario {
            name: "3 of 5 servers stepped +2 s (a lying majority)",
            truth_s: 0.0,
            offsets_s: vec![2.0, 2.0, 2.0, 0.0, 0.0],
        },
        Scenario {
            name: "servers spread ±20 ms around the truth",
            truth_s: 0.1,
            offsets_s: vec![0.08, 0.09, 0.1, 0.11, 0.12],
        },
    ];
    println!(
        "\n{:<48} {:>10} {:>14} {:>14} {:>16}",
        "scenario", "truth", "chronyd -Q err", "tsa err", "tsa state"
    );
    for sc in scenarios {
        let servers: Vec<NtpServer> = sc
            .offsets_s
            .iter()
            .map(|o| {
                NtpServer::start(Behaviour {
                    offset_ns: (o * 1e9) as i64,
                    ..Default::default()
                })
            })
            .collect();
        let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
        let chrony = chronyd_query(&addrs);
        let tsa = if sc.name.contains("stepped") {
            // Synchronize on the truth first, then let the majority step.
            for s in &servers[..3] {
                s.set(|b| b.offset_ns = 0);
            }
            let tsa = tsa_disciplined(&addrs, "step_confirm_rounds = 1000\n");
            wait_for(|| ready(&tsa), "synchronization", Duration::from_secs(10));
            for s in &servers[..3] {
                s.set(|b| b.offset_ns = 2_000_000_000);
            }
            std::thread::sleep(Duration::from_secs(2));
            tsa
        } else {
            let tsa = tsa_disciplined(&addrs, "");
            let _ = std::panic::catch_unwind(|| {
                wait_for(|| ready(&tsa), "sync", Duration::from_secs(10))
            });
            std::thread::sleep(Duration::from_secs(1));
            tsa
        };
        let report = clock_report(&tsa);
        let fmt = |v: Option<f64>| {
            v.map(|v| format!("{:+.6} s", v - sc.truth_s))
                .unwrap_or_else(|| "none".into())
        };
        println!(
            "{:<48} {:>+9.3}s {:>14} {:>14} {:>16}",
            sc.name,
            sc.truth_s,
            fmt(chrony),
            fmt(tsa_offset(&report)),
            state(&report)
        );
    }
}
