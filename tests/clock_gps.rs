//! GPS references end to end, through the real `tsa` server: the real gpsd (Debian's) reading
//! NMEA from a pseudo-terminal, a scripted gpsd-protocol server for the faults a real gpsd
//! cannot be made to show, and the NMEA reader on a pseudo-terminal. In-process NTP servers
//! supply the majority where one is needed.

#[path = "common/clock.rs"]
mod clock;
mod common;
#[path = "common/gpsd.rs"]
mod gpsd;
#[path = "common/ntp.rs"]
mod ntp;
#[path = "common/ports.rs"]
mod ports;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clock::{clock_report, query, ready, stamp, wait_for};
use common::Server;
use gpsd::{GpsdScript, NmeaFeed, NmeaScript, Pty, RealGpsd, ScriptedGpsd};
use ntp::{Behaviour, NtpServer};

fn tsa_with(ntp: &[NtpServer], extra: &str) -> Server {
    let addrs: Vec<_> = ntp.iter().map(|s| s.addr).collect();
    clock::tsa_disciplined(&addrs, extra)
}

fn ntp_servers(n: usize) -> Vec<NtpServer> {
    (0..n)
        .map(|_| NtpServer::start(Behaviour::default()))
        .collect()
}

/// One row of `tsa clock`'s source table.
#[derive(Debug)]
struct Row {
    reach: u32,
    selection: String,
    offset_ns: Option<f64>,
    distance_ns: Option<f64>,
}

/// The row of the source whose name starts with `prefix` ("gpsd ", "nmea ").
fn row(report: &str, prefix: &str) -> Option<Row> {
    let line = report.lines().find(|l| l.starts_with(prefix))?;
    // name (two words), reach (octal), selection, then offset, delay, distance, age: each
    // "-" or a value and its unit.
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut values = Vec::new();
    let mut i = 4;
    while i < words.len() {
        if words[i] == "-" {
            values.push(None);
            i += 1;
        } else {
            let unit = match *words.get(i + 1)? {
                "ns" => 1.0,
                "µs" => 1e3,
                "ms" => 1e6,
                "s" => 1e9,
                other => panic!("unit {other:?} in {line:?}"),
            };
            values.push(Some(words[i].parse::<f64>().ok()? * unit));
            i += 2;
        }
    }
    Some(Row {
        reach: u32::from_str_radix(words.get(2)?, 8).ok()?,
        selection: words.get(3)?.to_string(),
        offset_ns: *values.first()?,
        distance_ns: *values.get(2)?,
    })
}

/// The octets sent and received on the TSA's established connection to `addr`, as `ss`
/// reports them (None while no `tsa` process has one).
fn tsa_connection_to(addr: std::net::SocketAddr) -> Option<(u64, u64)> {
    let out = common::ok(std::process::Command::new("ss").args([
        "-Htnpi",
        "state",
        "established",
        "dst",
        &addr.to_string(),
    ]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Each connection: a line with its process, then one of TCP information.
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.contains("((\"tsa\"") {
            let info = lines.next().unwrap_or_default();
            let field = |name: &str| {
                info.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            return Some((field("bytes_sent:"), field("bytes_received:")));
        }
    }
    None
}

fn selection(server: &Server, prefix: &str) -> Option<String> {
    row(&clock_report(server), prefix).map(|r| r.selection)
}

/// Debian's gpsd reads RMC, GGA and Garmin's PGRMF from a pseudo-terminal, once a second: GGA
/// gives it the 3D fix (mode 3) and PGRMF the leap-second count, so its TPV reports qualify;
/// there is no pulse on a terminal, so the TSA uses gpsd's TOFF (serial time) reports.
#[test]
fn the_real_gpsd_fed_nmea_on_a_pty_is_selected() {
    let pty = Arc::new(Pty::open());
    let gpsd = RealGpsd::start(&pty.path);
    pty.flush();
    let _feed = NmeaFeed::start(
        pty.clone(),
        NmeaScript {
            pgrmf: true,
            ..Default::default()
        },
    );
    let ntp = ntp_servers(2);
    let server = tsa_with(
        &ntp,
        &format!(
            "gpsd = \"{}\"\nmin_agreeing = 3\nmax_sample_age_ms = 3000\n",
            gpsd.addr
        ),
    );
    wait_for(
        || selection(&server, "gpsd ").as_deref() == Some("selected"),
        "the real gpsd selected",
        Duration::from_secs(25),
    );
    let report = clock_report(&server);
    assert!(report.contains("State       : synchronized"), "{report}");
    let gps = row(&report, "gpsd ").unwrap();
    // TOFF: serial time, up to 700 ms late (the default): the interval runs from the offset of
    // a terminal (near 0) to 700 ms after it, so it is centred 350 ms after it.
    let distance = gps.distance_ns.unwrap();
    assert!((350e6..450e6).contains(&distance), "{report}");
    assert!((gps.offset_ns.unwrap() - 350e6).abs() < 100e6, "{report}");
    assert!(ready(&server));
}

/// The same gpsd without PGRMF: it reports 3D fixes but no leap-second count, and the TSA never
/// takes a sample from it.
#[test]
fn the_real_gpsd_without_a_leap_second_count_is_never_used() {
    let pty = Arc::new(Pty::open());
    let gpsd = RealGpsd::start(&pty.path);
    pty.flush();
    let _feed = NmeaFeed::start(pty.clone(), NmeaScript::default());
    let ntp = ntp_servers(2);
    let server = tsa_with(
        &ntp,
        &format!(
            "gpsd = \"{}\"\nmin_agreeing = 2\nmax_sample_age_ms = 3000\n",
            gpsd.addr
        ),
    );
    let tpv = gpsd.tpv_reports(3, Duration::from_secs(20));
    assert!(
        tpv.iter().filter(|v| v["mode"] == 3).count() >= 3,
        "gpsd gave no three 3D fixes: {tpv:?}"
    );
    assert!(
        tpv.iter().all(|v| v.get("leapseconds").is_none()),
        "{tpv:?}"
    );
    wait_for(
        || ready(&server),
        "synchronization",
        Duration::from_secs(10),
    );
    // The TSA does talk to it: it sent its watch and gpsd answered (a source that never
    // connected would be unusable too).
    wait_for(
        || tsa_connection_to(gpsd.addr).is_some_and(|(sent, received)| sent > 0 && received > 0),
        "the TSA's watch on gpsd, answered",
        Duration::from_secs(60),
    );
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let report = clock_report(&server);
        let gps = row(&report, "gpsd ").unwrap();
        assert_eq!(gps.reach, 0, "{report}");
        assert_eq!(gps.selection, "unusable", "{report}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Receivers that never give three qualifying TPV in a row are never selected: 3D fixes broken
/// by a 2D one every third report, and 3D fixes without a leap-second count. Once the first
/// keeps its 3D fix, it is selected (the setup can select).
#[test]
fn a_receiver_without_three_3d_fixes_in_a_row_is_never_selected() {
    let flaky = ScriptedGpsd::start(GpsdScript {
        modes: vec![3, 3, 2],
        pps_offset_ns: Some(0),
        ..Default::default()
    });
    let no_leap = ScriptedGpsd::start(GpsdScript {
        leapseconds: None,
        pps_offset_ns: Some(0),
        ..Default::default()
    });
    let ntp = ntp_servers(2);
    let config = |g: &ScriptedGpsd| {
        format!(
            "gpsd = \"{}\"\nmin_agreeing = 2\nmax_sample_age_ms = 3000\n",
            g.addr
        )
    };
    let a = tsa_with(&ntp, &config(&flaky));
    let b = tsa_with(&ntp, &config(&no_leap));
    wait_for(
        || ready(&a) && ready(&b),
        "synchronization on NTP",
        Duration::from_secs(10),
    );
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        for server in [&a, &b] {
            let report = clock_report(server);
            let gps = row(&report, "gpsd ").unwrap();
            assert_eq!(gps.reach, 0, "{report}");
            assert_eq!(gps.selection, "unusable", "{report}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Both servers did talk to their receiver (a source that never connected would be
    // unusable too): a connection each, and its watch.
    let watch = r#"?WATCH={"enable":true,"json":true,"pps":true}"#;
    for g in [&flaky, &no_leap] {
        wait_for(
            || !g.watches.lock().unwrap().is_empty(),
            "the TSA's watch",
            Duration::from_secs(60),
        );
        assert!(g.connections.load(Ordering::SeqCst) >= 1);
        let watches = g.watches.lock().unwrap();
        assert!(watches.iter().all(|w| w == watch), "{watches:?}");
    }
    flaky.set(|s| s.modes = vec![3]);
    wait_for(
        || selection(&a, "gpsd ").as_deref() == Some("selected"),
        "the receiver selected once its fix holds",
        Duration::from_secs(10),
    );
}

/// A gpsd that goes quiet: the source is missed and unusable. One that closes its connections:
/// the client reconnects, and the source is selected again.
#[test]
fn a_quiet_gpsd_becomes_unusable_and_a_closed_one_is_reconnected() {
    let gpsd = ScriptedGpsd::start(GpsdScript {
        pps_offset_ns: Some(0),
        ..Default::default()
    });
    let ntp = ntp_servers(2);
    let server = tsa_with(
        &ntp,
        &format!(
            "gpsd = \"{}\"\nmin_agreeing = 2\nmax_sample_age_ms = 1000\n",
            gpsd.addr
        ),
    );
    wait_for(
        || selection(&server, "gpsd ").as_deref() == Some("selected"),
        "gpsd selected",
        Duration::from_secs(10),
    );
    gpsd.set(|s| s.silent = true);
    // Unusable once its samples age out; missed (reach's newest bit clear) after 3 s of quiet.
    wait_for(
        || {
            row(&clock_report(&server), "gpsd ")
                .is_some_and(|r| r.selection == "unusable" && r.reach & 1 == 0)
        },
        "the quiet gpsd missed and unusable",
        Duration::from_secs(8),
    );
    assert_eq!(gpsd.connections.load(Ordering::SeqCst), 1);

    gpsd.set(|s| {
        s.silent = false;
        s.refuse = true;
    });
    wait_for(
        || gpsd.connections.load(Ordering::SeqCst) >= 3,
        "reconnections after the connection closed",
        Duration::from_secs(10),
    );
    gpsd.set(|s| s.refuse = false);
    wait_for(
        || selection(&server, "gpsd ").as_deref() == Some("selected"),
        "gpsd selected again after reconnecting",
        Duration::from_secs(15),
    );
}

/// PPS reports say the system clock is 300 ms behind while TPV reports say it is right: the TSA
/// uses the pulses (offset +300 ms, distance of the 1 ms PPS precision) and stamps with them.
#[test]
fn pps_offsets_are_used() {
    let gpsd = ScriptedGpsd::start(GpsdScript {
        pps_offset_ns: Some(300_000_000),
        ..Default::default()
    });
    let server = tsa_with(
        &[],
        &format!(
            "gpsd = \"{}\"\nmin_agreeing = 1\nmax_sample_age_ms = 3000\n",
            gpsd.addr
        ),
    );
    wait_for(
        || ready(&server),
        "synchronization",
        Duration::from_secs(10),
    );
    let report = clock_report(&server);
    let gps = row(&report, "gpsd ").unwrap();
    assert_eq!(gps.selection, "selected", "{report}");
    let offset = gps.offset_ns.unwrap();
    assert!((offset - 300e6).abs() < 5e6, "{report}");
    assert!(gps.distance_ns.unwrap() < 10e6, "{report}");

    let work = tempfile::tempdir().unwrap();
    query(work.path());
    let (response, sent, received) = stamp(&server, work.path());
    assert!(response.granted(), "{:?}", response.status_text);
    let tst = response.token.as_ref().unwrap().tst_info();
    let gen = tst.gen_time.unix_ns() as i64;
    let accuracy = tst.accuracy.unwrap().as_ns() as i64;
    assert!(accuracy < 10_000_000, "accuracy {accuracy} ns");
    let (lo, hi) = (sent as i64 + 300_000_000, received as i64 + 300_000_000);
    assert!(
        gen + accuracy + 5_000_000 >= lo && gen - accuracy - 5_000_000 <= hi,
        "genTime {gen} ± {accuracy} outside [{lo}, {hi}]"
    );
}

/// PPS reports a whole second off the TPV time (gpsd pairing each pulse with the wrong
/// sentence): the pulses are refused, and the TSA follows the serial time (its offset within
/// the TPV's lag, its distance the serial time's), never the second-off pulses.
#[test]
fn pps_a_second_off_the_serial_time_is_not_used() {
    let gpsd = ScriptedGpsd::start(GpsdScript {
        pps_offset_ns: Some(1_000_000_000),
        ..Default::default()
    });
    let server = tsa_with(
        &[],
        &format!(
            "gpsd = \"{}\"\nmin_agreeing = 1\nmax_sample_age_ms = 3000\n",
            gpsd.addr
        ),
    );
    wait_for(
        || selection(&server, "gpsd ").as_deref() == Some("selected"),
        "gpsd selected",
        Duration::from_secs(10),
    );
    for _ in 0..3 {
        let report = clock_report(&server);
        let gps = row(&report, "gpsd ").unwrap();
        let offset = gps.offset_ns.unwrap();
        // TPV lines arrive after their second: UTC − local in [0, 700 ms], centred.
        assert!((0.0..700e6).contains(&offset), "{report}");
        assert!(
            gps.distance_ns.unwrap() > 100e6,
            "the serial time's: {report}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The NMEA reader on a pseudo-terminal: RMC and ZDA five times a second, each cycle with a
/// corrupted RMC five seconds off (refused by its checksum). Selected with two NTP servers;
/// unusable once the receiver reports no fix (RMC status V).
#[test]
fn the_nmea_reader_on_a_pty_is_selected_and_dropped_without_a_fix() {
    let pty = Arc::new(Pty::open());
    let ntp = ntp_servers(2);
    let server = tsa_with(
        &ntp,
        &format!(
            "nmea_device = \"{}\"\nmin_agreeing = 3\nmax_sample_age_ms = 1500\n",
            pty.path.display()
        ),
    );
    // The reader opened the terminal at start; nothing stale waits in it.
    std::thread::sleep(Duration::from_millis(300));
    pty.flush();
    let feed = NmeaFeed::start(
        pty.clone(),
        NmeaScript {
            corrupt: true,
            period: Duration::from_millis(200),
            aligned: false,
            ..Default::default()
        },
    );
    wait_for(
        || selection(&server, "nmea ").as_deref() == Some("selected"),
        "the NMEA receiver selected",
        Duration::from_secs(10),
    );
    let report = clock_report(&server);
    assert!(report.contains("State       : synchronized"), "{report}");
    let gps = row(&report, "nmea ").unwrap();
    // Up to 700 ms late (the default): centred 350 ms after the offset of a terminal (near 0).
    assert!((gps.offset_ns.unwrap() - 350e6).abs() < 100e6, "{report}");
    assert!(gps.distance_ns.unwrap() >= 350e6, "{report}");

    feed.set(|s| s.status = 'V');
    wait_for(
        || selection(&server, "nmea ").as_deref() == Some("unusable"),
        "the receiver without a fix unusable",
        Duration::from_secs(5),
    );
}
