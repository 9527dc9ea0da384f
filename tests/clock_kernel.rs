//! The kernel clock source (`[clock] source = "kernel"`) of a real `tsa serve`, whatever the
//! host's own clock state: the server runs with `clock_support/adjtimex.c` preloaded, which
//! answers its adjtimex(2) reads from a state this test writes (the time itself stays the
//! system's), beside a real `chronyd -x` (which never touches the clock) following an NTP
//! server of the test's, whose correction still to slew the source reads from its command
//! port. Unsynchronized, past the declared accuracy, inserting a leap second, and while
//! chronyd has a correction larger than the accuracy to slew, every request is
//! `timeNotAvailable` and the server is not ready, as it is once chronyd has gone;
//! synchronized, each token's accuracy covers the kernel's `maxerror`, the offset the kernel
//! has still to slew and chronyd's.

#[path = "common/chrony.rs"]
mod chrony;
#[path = "common/clock.rs"]
mod clock;
mod common;
#[path = "common/ntp.rs"]
mod ntp;
#[path = "common/ports.rs"]
mod ports;

use std::path::{Path, PathBuf};
use std::time::Duration;

use libc::{STA_PLL, STA_UNSYNC, TIME_ERROR, TIME_OK, TIME_OOP};

use chrony::Chronyd;
use clock::{query, stamp, wait_for};
use common::{curl_post, openssl, Server, TSA};
use ntp::{Behaviour, NtpServer};
use tsa::client::read::Response;
use tsa::clock::kernel::time_daemons;
use tsa::protocol::FailInfo;

/// The declared accuracy of the server under test.
const MAX_ACCURACY_MS: u64 = 100;

/// The kernel state the preloaded library answers with.
struct Kernel(PathBuf);

impl Kernel {
    /// Writes the state whole (a rename), so that a read sees it or the one before.
    fn set(&self, rc: i32, status: i32, max_error_us: i64, offset_us: i64) {
        let next = self.0.with_extension("next");
        std::fs::write(&next, format!("{rc} {status} {max_error_us} {offset_us}\n")).unwrap();
        std::fs::rename(&next, &self.0).unwrap();
    }
}

/// Waits until the server is not ready for a reason that says `why`, then checks that a
/// request is refused with `timeNotAvailable`.
fn assert_refuses(server: &Server, work: &Path, why: &str) {
    wait_for(
        || {
            let (code, text) = common::readiness(&server.admin_url);
            code == 503 && text.contains(why)
        },
        why,
        Duration::from_secs(30),
    );
    let (response, _, _) = stamp(server, work);
    assert_eq!(response.status, 2, "{why}: {:?}", response.status_text);
    assert_eq!(
        response.fail_info(),
        Some(FailInfo::TimeNotAvailable),
        "{why}"
    );
}

/// Waits until the server is ready, then checks tokens: granted, with an accuracy of at least
/// `bound_ns` (and within the declared one), and genTime ± accuracy around the request.
fn assert_grants(server: &Server, work: &Path, bound_ns: u64) {
    wait_for(
        || common::readiness(&server.admin_url).0 == 200,
        "readiness on a synchronized kernel",
        Duration::from_secs(30),
    );
    for _ in 0..3 {
        let (response, sent, received) = stamp(server, work);
        assert!(response.granted(), "{:?}", response.status_text);
        let token = response.token.expect("a token");
        let tst = token.tst_info();
        let gen = tst.gen_time.unix_ns();
        let accuracy = tst.accuracy.expect("accuracy").as_ns();
        assert!(
            (bound_ns..=MAX_ACCURACY_MS * 1_000_000).contains(&accuracy),
            "accuracy {accuracy} ns for a kernel bound of {bound_ns} ns"
        );
        assert!(gen.saturating_sub(accuracy) <= received && gen + accuracy >= sent);
    }
}

#[test]
fn the_kernel_clock_is_trusted_only_while_the_kernel_vouches_for_it() {
    // Beside the test binaries: a temporary directory may not allow executing.
    let tools = tempfile::tempdir_in(Path::new(TSA).parent().unwrap()).unwrap();
    let library = common::preload_library("tests/clock_support/adjtimex.c", tools.path());
    let kernel = Kernel(tools.path().join("kernel-state"));
    kernel.set(TIME_ERROR, STA_UNSYNC, 16_000_000, 0);
    let upstream = NtpServer::start(Behaviour::default());
    let chronyd = Chronyd::following(upstream.addr);
    let dir = Server::init(&[], "");
    let path = dir.path().join("tsa.toml");
    let mut config: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    let clock = config["clock"].as_table_mut().unwrap();
    clock.insert("source".into(), "kernel".into());
    clock.insert("max_accuracy_ms".into(), (MAX_ACCURACY_MS as i64).into());
    let command = chronyd.command.expect("a command port").to_string();
    clock.insert("chronyd_command".into(), command.into());
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let server = Server::serve_with_env(
        dir,
        &[
            ("LD_PRELOAD", library.to_str().unwrap()),
            ("TSA_TEST_KERNEL_STATE", kernel.0.to_str().unwrap()),
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    query(w);

    // The daemons as the server sees them (its own lookup through /proc).
    if time_daemons().contains(&"systemd-timesyncd") {
        // It keeps no bound: the source refuses whatever the kernel says.
        assert_refuses(&server, w, "systemd-timesyncd");
        return;
    }

    assert_refuses(&server, w, "STA_UNSYNC");
    // A request that is wrong in itself is refused for what is wrong with it.
    openssl(
        &[
            "ts", "-query", "-data", "data.bin", "-sha1", "-out", "sha1.tsq",
        ],
        w,
    );
    let (status, _, body) = curl_post(
        &server.url,
        &w.join("sha1.tsq"),
        "application/timestamp-query",
    );
    assert_eq!(status, 200);
    let sha1 = Response::from_der(&body).unwrap();
    assert_eq!(sha1.fail_info(), Some(FailInfo::BadAlg));

    // Synchronized: 20 ms of maxerror and 5 ms still to slew (microseconds: no STA_NANO).
    kernel.set(TIME_OK, STA_PLL, 20_000, 5_000);
    assert_grants(&server, w, 25_000_000);

    // The daemon's bound past the declared accuracy: no stamp, although synchronized.
    kernel.set(TIME_OK, STA_PLL, 150_000, 0);
    assert_refuses(&server, w, "accuracy");

    // A leap second being inserted: the kernel replays 23:59:59.
    kernel.set(TIME_OOP, STA_PLL, 20_000, 0);
    assert_refuses(&server, w, "leap second");

    // Synchronized again, and then lost again.
    kernel.set(TIME_OK, STA_PLL, 1_000, 0);
    assert_grants(&server, w, 1_000_000);
    kernel.set(TIME_ERROR, STA_UNSYNC, 16_000_000, 0);
    assert_refuses(&server, w, "STA_UNSYNC");

    // chronyd finds its server 2 s ahead and has that to slew (with -x it never does): the
    // kernel's maxerror leaves it out, the source does not.
    kernel.set(TIME_OK, STA_PLL, 1_000, 0);
    assert_grants(&server, w, 1_000_000);
    upstream.set(|b| b.offset_ns = 2_000_000_000);
    assert_refuses(&server, w, "accuracy");
    upstream.set(|b| b.offset_ns = 0);
    assert_grants(&server, w, 1_000_000);

    // chronyd stops answering (stopped, still there): its correction is unknown.
    chronyd.signal(libc::SIGSTOP);
    assert_refuses(&server, w, "chronyd's correction");
    chronyd.signal(libc::SIGCONT);
    assert_grants(&server, w, 1_000_000);

    // The daemon that keeps the bound goes away: missed within the 10 s between looks, where
    // no other time daemon runs on this host.
    drop(chronyd);
    if time_daemons().is_empty() {
        assert_refuses(&server, w, "no time daemon");
    }
}
