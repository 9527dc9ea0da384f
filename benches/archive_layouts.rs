//! What a durable write of tokens costs in CPU per record, for the archive's two layouts
//! (`rows` and `log`) and for two it does not use: the measurement behind "What bounds the archive's cost" in
//! `docs/performance.md`. On one core the archive's CPU is taken from the issuing, so CPU time
//! (user + system of this process, `getrusage`), not wall time, is what the archive costs in
//! tokens/s; wall time adds the wait for the disk.
//!
//! Each layout commits chained records of a real token (as `benches/archive.rs` makes them)
//! in groups of N, each group durable before the next (`synchronous=FULL` in WAL mode, with
//! SQLite's default checkpointing in the writing thread, or `fdatasync`):
//!
//! - `rows`: `SqliteStore::append`, one row per token with its indexes (`layout = "rows"`);
//! - `log`: `LogStore::append`, the token log (`layout = "log"`): frames, index entries, one
//!   `fdatasync` per commit (and the zeros written ahead, `LogStore::after_append`);
//! - `row-per-commit`: one row per commit in a table of its own in the same database,
//!   holding the commit's records (each the canonical record encoding, the token without its
//!   certificates), with the commit's ranges of positions, counters and genTimes indexed;
//! - `file`: the same octets appended to a file and `fdatasync`ed, without any index: the
//!   floor of every layout that makes records durable one commit at a time.
//!
//! N is 32 (about what a commit holds when one core issues 20 k tokens/s) and 128. The layouts
//! alternate, three rounds, so that a noisy machine shows in the spread.
//!
//! ```sh
//! cargo bench --bench archive_layouts
//! ```

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use tsa::archive::log::LogStore;
use tsa::archive::record::{canonical, split_certificates, StoredRecord};
use tsa::archive::sqlite::SqliteStore;
use tsa::archive::store::ArchiveStore;

use common::{real_token, Records, INSTANCE};

/// Records committed per layout, group size and round.
const RECORDS: usize = 64_000;
const ROUNDS: usize = 3;

#[derive(Clone, Copy)]
enum Layout {
    Rows,
    Log,
    RowPerCommit,
    File,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Self::Rows => "rows",
            Self::Log => "log",
            Self::RowPerCommit => "row-per-commit",
            Self::File => "file",
        }
    }
}

/// Where one layout writes, opened fresh for each round.
enum Target {
    Rows(SqliteStore),
    Log(Box<LogStore>),
    RowPerCommit(SqliteStore),
    File(std::fs::File),
}

impl Target {
    fn open(layout: Layout, dir: &Path) -> Self {
        let database = || {
            SqliteStore::open(&dir.join("archive.sqlite"), Duration::from_secs(5))
                .expect("the archive database")
        };
        match layout {
            Layout::Rows => Self::Rows(database()),
            Layout::Log => {
                let mut db = database();
                db.settle_layout(tsa::archive::sqlite::Layout::Log)
                    .expect("a new archive");
                Self::Log(Box::new(LogStore::open(db)))
            }
            Layout::RowPerCommit => {
                let store = database();
                store
                    .connection()
                    .execute_batch(
                        "CREATE TABLE commits (instance_id BIGINT NOT NULL, \
                         last_seq BIGINT NOT NULL, first_seq BIGINT NOT NULL, \
                         min_counter BIGINT NOT NULL, max_counter BIGINT NOT NULL, \
                         min_gen_time_ns BIGINT NOT NULL, max_gen_time_ns BIGINT NOT NULL, \
                         records BLOB NOT NULL, PRIMARY KEY (instance_id, last_seq)); \
                         CREATE INDEX commits_counter ON commits (instance_id, min_counter); \
                         CREATE INDEX commits_gen_time ON commits (min_gen_time_ns);",
                    )
                    .expect("the table of commits");
                Self::RowPerCommit(store)
            }
            Layout::File => Self::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("records.log"))
                    .expect("the record file"),
            ),
        }
    }

    /// Makes `records` durable.
    fn commit(&mut self, records: &[StoredRecord]) {
        match self {
            Self::Rows(store) => store.append(INSTANCE, records, &[]).expect("append"),
            Self::Log(store) => {
                store.append(INSTANCE, records, &[]).expect("append");
                // The room written ahead, as the writer does once the requests are answered.
                store.after_append();
            }
            Self::RowPerCommit(store) => {
                let (first, last) = (&records[0], &records[records.len() - 1]);
                let conn = store.connection();
                conn.execute_batch("BEGIN IMMEDIATE").expect("begin");
                conn.prepare_cached("INSERT INTO commits VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")
                    .expect("insert")
                    .execute(rusqlite::params![
                        INSTANCE,
                        last.seq,
                        first.seq,
                        first.counter,
                        last.counter,
                        first.record.gen_time_ns,
                        last.record.gen_time_ns,
                        encode(records),
                    ])
                    .expect("insert");
                conn.prepare_cached(
                    "UPDATE instances SET max_counter = ?2, max_gen_time_ns = ?3 \
                     WHERE instance_id = ?1",
                )
                .expect("update")
                .execute(rusqlite::params![
                    INSTANCE,
                    last.counter,
                    last.record.gen_time_ns
                ])
                .expect("update");
                conn.execute_batch("COMMIT").expect("commit");
            }
            Self::File(file) => {
                file.write_all(&encode(records)).expect("write");
                file.sync_data().expect("fdatasync");
            }
        }
    }
}

/// The records one after the other, each its length and its canonical encoding with the
/// token's certificates left out (a store keeps them once).
fn encode(records: &[StoredRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.len() * 1_024);
    for s in records {
        let mut record = s.record.clone();
        if let Some((compact, _)) = split_certificates(&record.token) {
            record.token = compact;
        }
        let bytes = canonical(s.instance_id, s.seq, s.counter, &record, &s.prev_hash);
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes the struct it is given; zero is a valid rusage.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then one short round,
    // so that the benchmark is checked to run.
    let benching = std::env::args().any(|a| a == "--bench");
    let (records_per_run, rounds) = if benching {
        (RECORDS, ROUNDS)
    } else {
        (1_024, 1)
    };
    let token = real_token();
    println!("layout          records/commit  cpu µs/record  wall µs/record");
    for group in [32usize, 128] {
        for _ in 0..rounds {
            for layout in [
                Layout::Rows,
                Layout::Log,
                Layout::RowPerCommit,
                Layout::File,
            ] {
                let dir = tempfile::tempdir().expect("a temporary directory");
                let mut target = Target::open(layout, dir.path());
                let mut records = Records::new(token.clone());
                let (mut cpu, mut wall) = (Duration::ZERO, Duration::ZERO);
                for _ in 0..records_per_run / group {
                    let chained = records.chained(group);
                    let (cpu_before, started) = (cpu_time(), Instant::now());
                    target.commit(&chained);
                    wall += started.elapsed();
                    cpu += cpu_time() - cpu_before;
                }
                let per_record = |d: Duration| d.as_secs_f64() * 1e6 / records_per_run as f64;
                println!(
                    "{:<15} {group:>14} {:>14.2} {:>15.2}",
                    layout.name(),
                    per_record(cpu),
                    per_record(wall)
                );
            }
        }
    }
}
