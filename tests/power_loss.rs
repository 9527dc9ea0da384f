//! Durability of the archive at a power cut. `tsa serve` runs with
//! `archive_support/powercut.c` preloaded: it records what every write to a file overwrote
//! since that file's last fsync/fdatasync, and when the test asks for the cut, it undoes those
//! writes (newest first) and ends the process, leaving the files as a power loss that took the
//! page cache would. A kill -9 (`tests/crash.rs`) cannot tell a commit that reached the disk
//! from one that only reached the page cache; this test can: every token a client received
//! must have been synced before it left.
//!
//! Under load from several clients, the power is cut again and again (once right after the
//! start), and the server started again on the same state directory. Afterwards every token a client received is archived
//! byte for byte and found by its imprint, no serial is archived twice, each run's counters
//! are above every earlier run's (the serial reservations were synced too), and the chain,
//! with its signed checkpoints, verifies.

mod archive_support;
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use archive_support::{
    archive_cli, archived_records, assert_layout, check_received, get, init, open_store, stamp,
    Conn, Load, Received, Serving,
};

const ROUNDS: usize = 8;
const CLIENTS: usize = 4;
/// Tokens the clients receive in a round before the power is cut (while they keep asking):
/// none in the first round, so that the cut comes while the server has just started (its
/// first serial reservation, the archive's start event), then a varying number.
const BEFORE_CUT: [usize; ROUNDS] = [0, 150, 40, 300, 1, 220, 90, 10];

/// The power cut as a shared library, compiled with the system's C compiler into `dir`.
fn powercut_library(dir: &Path) -> PathBuf {
    common::preload_library("tests/archive_support/powercut.c", dir)
}

#[test]
fn a_power_cut_under_load_loses_no_token_a_client_received() {
    power_cuts("rows");
}

#[test]
fn a_power_cut_under_load_loses_no_token_a_client_received_with_the_token_log() {
    power_cuts("log");
}

/// Cuts the power under load, round after round, on an archive of `layout`.
fn power_cuts(layout: &str) {
    let started = Instant::now();
    // Small blocks: serial reservations (synced database row and state file) go on all the
    // time, also at the cut.
    let dir = init(&format!(
        "serial_block = 40\ncheckpoint_interval_s = 1\nlayout = \"{layout}\"\nlog_segment_mib = 1"
    ));
    let d = dir.path();
    let tools = tempfile::tempdir().unwrap();
    let library = powercut_library(tools.path());
    let trigger = tools.path().join("cut");
    // Per run: the tokens the clients received.
    let mut received: Vec<Vec<Received>> = Vec::new();

    for (round, &before_cut) in BEFORE_CUT.iter().enumerate() {
        let server = Serving::start_with(
            d,
            &[
                ("LD_PRELOAD", library.as_os_str()),
                ("TSA_POWER_CUT", trigger.as_os_str()),
            ],
        );
        let load = Load::start(&server.public, CLIENTS, &format!("round {round}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while load.received() < before_cut {
            assert!(Instant::now() < deadline, "round {round}: too few tokens");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::write(&trigger, b"").unwrap();
        let status = server
            .wait(Duration::from_secs(30))
            .expect("the power cut ends the server");
        // 137 from the library's _exit, not a signal nor an exit of the server's own.
        assert_eq!(status.code(), Some(137), "round {round}: {status}");
        received.push(load.stop());
        std::fs::remove_file(&trigger).unwrap();
    }
    // A last run with the power on: its shutdown signs a checkpoint over everything.
    let server = Serving::start(d);
    let mut conn = Conn::connect(&server.public).unwrap();
    let last = stamp(&mut conn, b"after the power cuts").unwrap().unwrap();
    server.stop();
    received.push(vec![last]);

    let records = archived_records(d);
    assert_layout(d, layout);
    check_received(&records, &received);
    let total: usize = received.iter().map(Vec::len).sum();
    assert!(records.len() >= total);

    // The imprint index (its commits are not synced: a cut may take its last ones) still
    // finds every token, through its runs or above its watermark.
    let mut store = open_store(d);
    for got in received.iter().flatten() {
        let found = store.records_by_imprint(&got.imprint, 10).unwrap();
        assert!(
            found.records.iter().any(|r| r.record.serial == got.serial),
            "a token is not found by its imprint"
        );
    }

    let (ok, report) = archive_cli(d, &["verify"]);
    assert!(ok, "{report}");
    assert!(report.contains(": OK"), "{report}");

    eprintln!(
        "{ROUNDS} power cuts ({layout}): {} tokens archived, {total} received by clients, in {:.1} s",
        records.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The token log's `fdatasync` fails (the library's `TSA_SYNC_FAIL`) under load, for a while,
/// and then works again. The writer frames and writes the next commit while the last one is
/// synced on a thread of its own, chained to it: when that sync fails, the commit is cut off,
/// the next one is refused with it (it was chained to records that are not there), readiness
/// fails, and once syncs work again the chain goes on from the last durable record. Every
/// token a client received is archived and the chain verifies; the requests in the failing
/// commits got a rejection, not a token.
#[test]
fn commits_whose_sync_fails_are_refused_and_the_chain_goes_on_from_the_last_durable_one() {
    let dir = init("layout = \"log\"\ncheckpoint_interval_s = 1");
    let d = dir.path();
    let tools = tempfile::tempdir().unwrap();
    let library = powercut_library(tools.path());
    let failing = tools.path().join("fail");
    let server = Serving::start_with(
        d,
        &[
            ("LD_PRELOAD", library.as_os_str()),
            ("TSA_SYNC_FAIL", failing.as_os_str()),
        ],
    );
    let load = Load::allowing_refusals(&server.public, CLIENTS, "sync failures");
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    for round in 0..3 {
        let before = load.received();
        wait_for("tokens before the failure", &|| {
            load.received() >= before + 100
        });
        std::fs::write(&failing, b"").unwrap();
        let refused = load.refused();
        wait_for("a refusal while syncs fail", &|| load.refused() > refused);
        // Not ready for as long as the syncs fail, although the failed commits' cuts (an
        // fsync) go through: the recovery's probe syncs a write of its own.
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            assert_eq!(
                get(&server.admin, "/health/ready").0,
                503,
                "round {round}: ready while the archive cannot be written"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::remove_file(&failing).unwrap();
        let after = load.received();
        wait_for("tokens after the failure", &|| {
            load.received() >= after + 100
        });
        assert_eq!(get(&server.admin, "/health/ready").0, 200, "round {round}");
    }
    let refused = load.refused();
    let received = load.stop();
    server.stop();

    let records = archived_records(d);
    check_received(&records, std::slice::from_ref(&received));
    // Strict: the index entries, written after each sync, match the frames.
    let (ok, report) = archive_cli(d, &["verify", "--strict"]);
    assert!(ok, "{report}");
    assert!(report.contains(": OK"), "{report}");
    eprintln!(
        "{} tokens received, {refused} requests refused while syncs failed, {} archived",
        received.len(),
        records.len()
    );
}
