//! The archive's disk fills up under load: the state directory sits on a small tmpfs of its
//! own, six keep-alive clients stamp without pause until writes fail with ENOSPC, and the
//! tmpfs is then grown. While the disk is full every request gets a DER systemFailure and no
//! token, and readiness says so without flapping; once there is room again the server
//! recovers by itself, once.
//! Afterwards every token a client received is archived byte for byte and nothing else is,
//! the chain verifies, and a restart on the same directory issues above every earlier serial.
//!
//! Mounting a tmpfs needs root (CAP_SYS_ADMIN), as the test suite has on this project's
//! machines.

mod archive_support;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use archive_support::{
    archive_cli, assert_layout, get, init_in, open_store, stamp, Conn, Received, Serving,
};
use tsa::archive::record::StoredRecord;
use tsa::archive::serial::layout;
use tsa::protocol::FailInfo;

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        mount(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            dir.path(),
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, size: &str) {
        mount(&["-o", &format!("remount,size={size}")], self.path());
    }
}

/// `mount ARGS… TARGET`; a tmpfs needs root.
fn mount(args: &[&str], target: &Path) {
    let out = Command::new("mount")
        .args(args)
        .arg(target)
        .output()
        .expect("mount");
    assert!(
        out.status.success(),
        "mount {args:?} (a tmpfs needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// What the clients saw: tokens, and refusals counted.
#[derive(Default)]
struct Seen {
    tokens: Mutex<Vec<Received>>,
    refused: AtomicUsize,
    granted: AtomicUsize,
}

#[test]
fn a_full_disk_under_load_withholds_tokens_and_recovers_without_losing_one() {
    full_disk("rows");
}

#[test]
fn a_full_disk_under_load_withholds_tokens_and_recovers_without_losing_one_with_the_token_log() {
    full_disk("log");
}

fn full_disk(layout: &str) {
    let fs = Tmpfs::mount("6m");
    let state: PathBuf = fs.path().join("state");
    // Small serial blocks: reservations (a state file written each time) happen while the
    // disk is full too.
    init_in(
        &state,
        &format!("serial_block = 40\ncheckpoint_interval_s = 1\nlayout = \"{layout}\"\nlog_segment_mib = 1"),
    );
    let server = Serving::start(&state);
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|c| {
            let (addr, stop, seen) = (server.public.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut conn = Conn::connect(&addr).unwrap();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let data = format!("client {c} request {i}");
                    match stamp(&mut conn, data.as_bytes()).expect("a reply") {
                        Ok(token) => {
                            seen.tokens.lock().unwrap().push(token);
                            seen.granted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(rejection) => {
                            assert_eq!(
                                rejection.fail_info(),
                                Some(FailInfo::SystemFailure),
                                "{:?}",
                                rejection.status_text
                            );
                            seen.refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let wait = |what: &str, limit: Duration, done: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    wait("the disk to fill up", Duration::from_secs(120), &|| {
        seen.refused.load(Ordering::Relaxed) >= 100
    });
    let (status, body) = get(&server.admin, "/health/ready");
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("archive"));
    // Full and staying full: still refusals, and nothing granted meanwhile.
    let granted_when_full = seen.granted.load(Ordering::Relaxed);
    let refused_when_full = seen.refused.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(seen.refused.load(Ordering::Relaxed) > refused_when_full);
    assert_eq!(seen.granted.load(Ordering::Relaxed), granted_when_full);

    eprintln!(
        "granted {granted_when_full} refused {} before the resize",
        seen.refused.load(Ordering::Relaxed)
    );
    fs.resize("64m");
    wait("issuing again", Duration::from_secs(30), &|| {
        seen.granted.load(Ordering::Relaxed) >= granted_when_full + 200
    });
    assert_eq!(get(&server.admin, "/health/ready").0, 200);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("a client thread panicked");
    }
    server.stop();

    // A restart on the same directory issues above every serial before it.
    let server = Serving::start(&state);
    let mut conn = Conn::connect(&server.public).unwrap();
    let last = stamp(&mut conn, b"after the restart")
        .unwrap()
        .expect("granted");
    server.stop();
    let received = std::mem::take(&mut *seen.tokens.lock().unwrap());
    let counter = |serial: &[u8]| layout::decode(serial).unwrap().1;
    let highest = received.iter().map(|t| counter(&t.serial)).max().unwrap();
    assert!(counter(&last.serial) > highest);

    // Exactly the tokens the clients received are archived, byte for byte.
    assert_layout(&state, layout);
    let mut store = open_store(&state);
    let mut records: HashMap<Vec<u8>, StoredRecord> = HashMap::new();
    store
        .for_each_record(0, 1, &mut |r| {
            let serial = r.record.serial.clone();
            assert!(
                records.insert(serial, r).is_none(),
                "a serial archived twice"
            );
            Ok(true)
        })
        .unwrap();
    let mut serials = HashSet::new();
    for got in received.iter().chain([&last]) {
        assert!(
            serials.insert(got.serial.clone()),
            "two clients got one serial"
        );
        let record = records
            .get(&got.serial)
            .unwrap_or_else(|| panic!("a token a client received is not archived"));
        assert_eq!(record.record.token, got.token);
        assert_eq!(record.response(), got.response);
    }
    assert_eq!(
        records.len(),
        serials.len(),
        "the archive holds tokens nobody received"
    );
    let recovered = store
        .events(0, u64::MAX)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "archive_recovered")
        .count();
    // One outage, one recovery: while the disk was full, a probe that happened to fit did
    // not count as recovered (readiness would flap between 200 and 503).
    assert_eq!(recovered, 1, "archive_recovered events");
    let (ok, report) = archive_cli(&state, &["verify"]);
    assert!(ok, "{report}");
}
