//! Shared by the archive's tests: a `tsa serve` process on a state directory that outlives it
//! (stopped by SIGTERM, SIGKILL or a power cut), a keep-alive HTTP/1.1 client, clients that
//! stamp until they are told to stop, the archive's database opened read-only, and the check
//! that every token a client received survived.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tsa::alg::DigestAlgorithm;
use tsa::archive::record::StoredRecord;
use tsa::archive::serial::layout;
use tsa::archive::store::ArchiveStore;
use tsa::client::read::Response;
use tsa::client::Query;

pub const TSA: &str = env!("CARGO_BIN_EXE_tsa");

/// `tsa init --archive` in a new temporary directory, with `extra` lines appended under
/// `[archive]`.
pub fn init(extra_archive: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    init_in(dir.path(), extra_archive);
    dir
}

/// `tsa init --archive` into `dir`, with `extra` lines appended under `[archive]` (the last
/// section `tsa init` writes).
pub fn init_in(dir: &Path, extra_archive: &str) {
    let out = Command::new(TSA)
        .args(["init", "--archive", "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join("tsa.toml");
    let mut config = std::fs::read_to_string(&path).unwrap();
    config.push_str(extra_archive);
    config.push('\n');
    std::fs::write(&path, config).unwrap();
}

/// A running `tsa serve`.
pub struct Serving {
    child: Child,
    /// `127.0.0.1:PORT` of the public and admin listeners.
    pub public: String,
    pub admin: String,
}

impl Serving {
    pub fn start(dir: &Path) -> Serving {
        Self::try_start(dir).unwrap_or_else(|e| panic!("tsa serve did not start: {e}"))
    }

    /// Starts the server; the error is its standard error when it exits instead.
    pub fn try_start(dir: &Path) -> Result<Serving, String> {
        Self::try_start_with(dir, &[])
    }

    /// Starts the server with these variables added to its environment.
    pub fn start_with(dir: &Path, env: &[(&str, &OsStr)]) -> Serving {
        Self::try_start_with(dir, env).unwrap_or_else(|e| panic!("tsa serve did not start: {e}"))
    }

    fn try_start_with(dir: &Path, env: &[(&str, &OsStr)]) -> Result<Serving, String> {
        let mut child = Command::new(TSA)
            .arg("serve")
            .arg("--config")
            .arg(dir.join("tsa.toml"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "error")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tsa serve");
        let first = announce::first_line(&mut child);
        if first.is_empty() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            let _ = child.wait();
            return Err(err);
        }
        // Keep standard error flowing (logs at error level only).
        let mut stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = stderr.read_to_end(&mut sink);
        });
        let addr = |s: &str| {
            s.trim_start_matches("http://")
                .trim_end_matches(['/', ')', '\n'])
                .to_string()
        };
        let public = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .map(addr)
            .unwrap();
        let admin = first.split("(admin ").nth(1).map(addr).unwrap();
        Ok(Serving {
            child,
            public,
            admin,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL, as a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the server to end by itself; its exit status, `None` after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// SIGTERM: the server finishes, signs a last checkpoint and exits.
    pub fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..200 {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("tsa serve did not stop on SIGTERM");
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// (Also in `common`, which some test crates hold beside this.)
#[allow(clippy::duplicate_mod)]
#[path = "../common/announce.rs"]
pub mod announce;
#[path = "../common/http1.rs"]
mod http1;
pub use http1::Conn;

/// GET on the admin listener (a connection of its own).
pub fn get(addr: &str, path: &str) -> (u16, Vec<u8>) {
    Conn::connect(addr)
        .unwrap()
        .request("GET", path, b"")
        .unwrap()
}

/// [`get`], with the value of the response's header field `name` (the first one), if any.
pub fn get_with_header(addr: &str, path: &str, name: &str) -> (u16, Option<String>, Vec<u8>) {
    let reply = Conn::connect(addr)
        .unwrap()
        .exchange("GET", path, b"")
        .unwrap();
    let value = reply.header(name).map(str::to_owned);
    (reply.status, value, reply.body)
}

/// A token a client received.
#[derive(Clone, Debug)]
pub struct Received {
    pub response: Vec<u8>,
    pub token: Vec<u8>,
    pub serial: Vec<u8>,
    pub gen_time_ns: u64,
    pub imprint: Vec<u8>,
    pub nonce: Option<Vec<u8>>,
}

/// POSTs a query for `data`; the granted token, or the decoded rejection.
pub fn stamp(conn: &mut Conn, data: &[u8]) -> std::io::Result<Result<Received, Response>> {
    stamp_query(
        conn,
        &Query::for_data(DigestAlgorithm::Sha256, data).unwrap(),
    )
}

/// POSTs `query`; the granted token, or the decoded rejection.
pub fn stamp_query(conn: &mut Conn, query: &Query) -> std::io::Result<Result<Received, Response>> {
    let (status, body) = conn.request("POST", "/", &query.to_der().unwrap())?;
    assert_eq!(status, 200);
    let response = Response::from_der(&body).expect("a DER TimeStampResp");
    let Some(token) = &response.token else {
        return Ok(Err(response));
    };
    let tst = token.tst_info();
    Ok(Ok(Received {
        token: token.der.clone(),
        serial: tst.serial_number.as_bytes().to_vec(),
        gen_time_ns: tst.gen_time.unix_ns(),
        imprint: tst.message_imprint.hashed_message.as_bytes().to_vec(),
        nonce: tst.nonce.map(|n| n.as_bytes().to_vec()),
        response: body,
    }))
}

pub fn database(dir: &Path) -> PathBuf {
    dir.join("archive.sqlite")
}

/// Checks that the archive of `dir` keeps its records where `layout` ("rows" or "log") does:
/// the token log's folder exists for a log and only for a log.
pub fn assert_layout(dir: &Path, layout: &str) {
    assert_eq!(
        database(dir).with_extension("tokens").is_dir(),
        layout == "log",
        "the records are where the {layout} layout keeps them"
    );
}

/// The archive of `dir`, in its layout, for reading.
pub fn open_store(dir: &Path) -> Box<dyn ArchiveStore> {
    tsa::archive::open_sqlite_read_only(&database(dir)).unwrap()
}

/// `tsa archive <args>` on the directory's configuration: (success, stdout + stderr).
pub fn archive_cli(dir: &Path, args: &[&str]) -> (bool, String) {
    let (status, out) = archive_cli_status(dir, args);
    (status == Some(0), out)
}

/// [`archive_cli`] with the exit status itself.
pub fn archive_cli_status(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(TSA)
        .arg("archive")
        .arg("--config")
        .arg(dir.join("tsa.toml"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Client threads, each on a keep-alive connection of its own, stamping data of their own
/// until [`Load::stop`] or until the server goes away under them; a rejection fails the test.
pub struct Load {
    stop: Arc<AtomicBool>,
    got: Arc<Mutex<Vec<Received>>>,
    /// Requests answered with a rejection (only where [`Load::allowing_refusals`]).
    refused: Arc<AtomicUsize>,
    clients: Vec<JoinHandle<()>>,
}

impl Load {
    /// `clients` threads stamping on `addr`; `label` makes their data unique across loads.
    pub fn start(addr: &str, clients: usize, label: &str) -> Load {
        Self::start_with(addr, clients, label, false)
    }

    /// [`Load::start`] whose clients count rejections and go on (a rejection panics
    /// otherwise).
    pub fn allowing_refusals(addr: &str, clients: usize, label: &str) -> Load {
        Self::start_with(addr, clients, label, true)
    }

    fn start_with(addr: &str, clients: usize, label: &str, refusals: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(AtomicUsize::new(0));
        let clients = (0..clients)
            .map(|c| {
                let (addr, stop, got) = (addr.to_string(), stop.clone(), got.clone());
                let refused = refused.clone();
                let label = label.to_string();
                std::thread::spawn(move || {
                    let Ok(mut conn) = Conn::connect(&addr) else {
                        return;
                    };
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let data = format!("{label} client {c} request {i}");
                        match stamp(&mut conn, data.as_bytes()) {
                            Ok(Ok(token)) => got.lock().unwrap().push(token),
                            Ok(Err(_)) if refusals => {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Err(rejection)) => {
                                panic!("rejected: {:?}", rejection.status_text)
                            }
                            // The server died under us.
                            Err(_) => return,
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        Load {
            stop,
            got,
            refused,
            clients,
        }
    }

    /// Tokens received so far.
    pub fn received(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Requests rejected so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    /// Stops the clients; the tokens they received.
    pub fn stop(self) -> Vec<Received> {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients {
            c.join().expect("a client thread panicked");
        }
        std::mem::take(&mut *self.got.lock().unwrap())
    }
}

/// The SQLite archive's records of instance 0, in chain order.
pub fn archived_records(dir: &Path) -> Vec<StoredRecord> {
    let mut records: Vec<StoredRecord> = Vec::new();
    open_store(dir)
        .for_each_record(0, 1, &mut |r| {
            records.push(r);
            Ok(true)
        })
        .unwrap();
    records
}

/// Checks the archive's `records` against what clients received, run by run (`received[k]`:
/// the tokens of the k-th server run): no serial or counter is archived twice, every token a
/// client received is archived byte for byte (and no two clients got one serial), and each
/// run's counters are above every earlier run's.
pub fn check_received(records: &[StoredRecord], received: &[Vec<Received>]) {
    let serials: HashSet<&[u8]> = records.iter().map(|r| r.record.serial.as_slice()).collect();
    let counters: HashSet<u64> = records.iter().map(|r| r.counter).collect();
    assert_eq!(serials.len(), records.len(), "a serial is archived twice");
    assert_eq!(counters.len(), records.len(), "a counter is archived twice");

    let by_serial: HashMap<&[u8], &StoredRecord> = records
        .iter()
        .map(|r| (r.record.serial.as_slice(), r))
        .collect();
    let mut seen = HashSet::new();
    for got in received.iter().flatten() {
        assert!(
            seen.insert(got.serial.clone()),
            "two clients got one serial"
        );
        let r = by_serial.get(got.serial.as_slice()).unwrap_or_else(|| {
            panic!(
                "a token a client received is not archived (serial {})",
                hex(&got.serial)
            )
        });
        assert_eq!(r.record.token, got.token);
        assert_eq!(r.response(), got.response);
    }

    let mut prev_max = 0;
    for (k, run) in received.iter().enumerate() {
        let counters: Vec<u64> = run
            .iter()
            .map(|t| layout::decode(&t.serial).unwrap().1)
            .collect();
        if let (Some(&min), Some(&max)) = (counters.iter().min(), counters.iter().max()) {
            assert!(
                min > prev_max,
                "run {k}: counter {min} not above {prev_max}"
            );
            prev_max = max;
        }
    }
}

/// `n` chained records of `instance_id` from position 1 on (counter = position).
pub fn chained(instance_id: u32, n: u64) -> Vec<StoredRecord> {
    chained_with(instance_id, n, |_, _| {})
}

/// [`chained`], each record changed by `adjust(position, record)` before it is chained.
pub fn chained_with(
    instance_id: u32,
    n: u64,
    adjust: impl Fn(u64, &mut tsa::archive::record::TokenRecord),
) -> Vec<StoredRecord> {
    use tsa::archive::record::{ClockAtIssue, TokenRecord, ZERO_HASH};
    let mut prev = ZERO_HASH;
    (1..=n)
        .map(|seq| {
            let mut record = TokenRecord {
                serial: tsa::archive::serial::layout::encode(instance_id, seq, [7; 7]).to_vec(),
                gen_time_ns: 1_700_000_000_000_000_000 + seq,
                accuracy_ns: 1_000_000,
                imprint_alg: "2.16.840.1.101.3.4.2.1".into(),
                imprint: vec![seq as u8; 32],
                policy: "1.3.6.1.4.1.32473.1".into(),
                nonce: None,
                client: None,
                clock: ClockAtIssue {
                    source: "test".into(),
                    state: "synchronized".into(),
                    bound_ns: 1,
                    sources: String::new(),
                },
                token: vec![0x30, 0x00],
            };
            adjust(seq, &mut record);
            let stored = StoredRecord::chain(instance_id, seq, seq, record, prev);
            prev = stored.hash;
            stored
        })
        .collect()
}

/// A checkpoint signing `record` as its instance's head (the store does not check the
/// signature; verification does).
pub fn checkpoint_of(record: &StoredRecord) -> tsa::archive::record::Checkpoint {
    tsa::archive::record::Checkpoint {
        instance_id: record.instance_id,
        seq: record.seq,
        head_hash: record.hash,
        time_ns: 1,
        algorithm: vec![],
        signature: vec![1],
        certificate: vec![],
        events: None,
        anchor_seq: 0,
    }
}

/// The rule for checkpoints stored at one position, which every store keeps: one that signs
/// the same head with a later events' head replaces the one there (the writer signs its head
/// again where only events came), one with an earlier, the same or no events' head leaves it,
/// and one that signs another head is refused. `records`: a chain appended to `store`.
pub fn one_checkpoint_per_position(store: &mut dyn ArchiveStore, records: &[StoredRecord]) {
    use tsa::archive::record::{ChainHead, Checkpoint};
    let at = records.last().expect("records");
    let signing = |events_seq: u64, signature: u8| Checkpoint {
        time_ns: events_seq + 1,
        signature: vec![signature],
        events: Some(ChainHead {
            seq: events_seq,
            hash: [signature; 32],
        }),
        ..checkpoint_of(at)
    };
    let stored = |store: &mut dyn ArchiveStore| {
        let all = store.checkpoints(at.instance_id).unwrap();
        assert_eq!(all.len(), 1, "one checkpoint per position");
        assert_eq!(all[0].seq, at.seq);
        (all[0].events.map(|e| e.seq), all[0].signature.clone())
    };
    // One without an events' head (as schema 1 stored it), then signed with one.
    store.add_checkpoint(&checkpoint_of(at)).unwrap();
    assert_eq!(stored(store), (None, vec![1]));
    store.add_checkpoint(&signing(3, 2)).unwrap();
    assert_eq!(stored(store), (Some(3), vec![2]), "not signed again");
    store.add_checkpoint(&signing(5, 3)).unwrap();
    assert_eq!(stored(store), (Some(5), vec![3]), "not signed again");
    // Earlier events, the same, none: the later one stays.
    for earlier in [signing(4, 4), signing(5, 5), checkpoint_of(at)] {
        store.add_checkpoint(&earlier).unwrap();
        assert_eq!(
            stored(store),
            (Some(5), vec![3]),
            "replaced by an earlier one"
        );
    }
    // Another head at the position, even with later events, is refused.
    let other = Checkpoint {
        head_hash: [0xEE; 32],
        ..signing(9, 6)
    };
    let refused = store.add_checkpoint(&other).unwrap_err().to_string();
    assert!(refused.contains("signs another head"), "{refused}");
    assert_eq!(
        stored(store),
        (Some(5), vec![3]),
        "replaced by another head"
    );
}
