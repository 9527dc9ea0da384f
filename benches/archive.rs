//! What archiving a token costs the archive's writer thread, per record.
//!
//! One criterion group `archive`:
//!
//! - `1_chain`: `StoredRecord::chain` of one record: its canonical encoding and SHA-256, what
//!   the writer does before it writes;
//! - `2_append/N` for N = 1, 32 and 256: one `SqliteStore::append` of N chained records, as
//!   one group commit: one transaction, WAL, `synchronous=FULL`, so one fsync of the
//!   write-ahead log per commit, in a database in a temporary directory (on the disk that
//!   holds it, which decides the fsync's cost). Reported per record (criterion's throughput
//!   in elements), so the three show how group commit spreads the commit;
//! - `3_index/8192`: the imprint indexer (`tsa::archive::imprints`) catching up with 8,192
//!   records the writer committed: one new run of them and the merges it completes, amortized
//!   over the iterations. It works on a thread of its own, in a database of its own, without
//!   fsync. (An index on `tokens.imprint` inside the archive, where each random imprint
//!   dirtied a page of its own, made the writer's append about 4 × as costly per record.)
//! - `4_lookup_by_imprint`: `records_by_imprint` of one record, through every run of the
//!   index and the record's row in the archive, once the index has caught up.
//! - `4_lookup_frequent_in_log/L` for L = 1 and 100: `records_by_imprint` in the token log
//!   (`archive.layout = "log"`, `LogStore`) of an imprint stamped 10,000 times (one record in
//!   four, as the hash of an empty file may be), asking the newest L (the admin listener asks
//!   1, `tsa archive get --imprint` 100): every match counted and its frame checked, in
//!   closed segments (through their imprint files) and the open one (through its index). The
//!   log is written once before, its files in the page cache.
//!
//! The records carry a real token: `tsa init --archive` (through `CARGO_BIN_EXE_tsa`) makes a
//! P-256 PKI once, `tsa::server::build` the TSA, and one issued token (certReq, so with its
//! certificate, which the store keeps once) is archived under new serials, imprints and
//! genTimes. The database grows as the benchmark runs, as an archive does.
//!
//! ```sh
//! cargo bench --bench archive
//! ```
//!
//! Compare `2_append/256` with `issuance-p256/1_raw_sign` of `cargo bench --bench issuance`
//! for the archive's cost beside the signature's.

mod common;

use criterion::{black_box, BenchmarkId, Criterion, Throughput};

use tsa::archive::imprints::{self, ImprintIndex};
use tsa::archive::log::LogStore;
use tsa::archive::record::{sha256, StoredRecord, ZERO_HASH};
use tsa::archive::sqlite::{Layout, SqliteStore};
use tsa::archive::store::ArchiveStore;

use common::{real_token, Records, INSTANCE};

/// Records per step of the imprint indexer.
const INDEX_STEP: usize = 8_192;

/// Records in the token log of `4_lookup_frequent_in_log`, committed so many at a time, and
/// how many of them have its imprint (every fourth).
const LOG_RECORDS: usize = 40_000;
const LOG_COMMIT: usize = 250;
const LOG_MATCHES: u64 = 10_000;

/// Its segments close at this length (64 MiB in a server), so that its records span several.
const LOG_SEGMENT: u64 = 16 << 20;

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let token = real_token();
    let mut group = c.benchmark_group("archive");

    let mut records = Records::new(token.clone());
    group.throughput(Throughput::Elements(1));
    group.bench_function("1_chain", |b| {
        b.iter_batched(
            || records.next_record(),
            |record| black_box(StoredRecord::chain(INSTANCE, 1, 1, record, ZERO_HASH)),
            criterion::BatchSize::SmallInput,
        )
    });

    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut store = SqliteStore::open(
        &dir.path().join("archive.sqlite"),
        std::time::Duration::from_secs(5),
    )
    .expect("the archive database");
    let mut records = Records::new(token.clone());
    for n in [1usize, 32, 256] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("2_append", n), &n, |b, &n| {
            b.iter_batched(
                || records.chained(n),
                |batch| store.append(INSTANCE, &batch, &[]).expect("append"),
                criterion::BatchSize::SmallInput,
            )
        });
    }

    // The imprint index, filled beside the writer: one step of the indexer over the records
    // the writer appended (untimed) since the last.
    let database = dir.path().join("archive.sqlite");
    let mut index = ImprintIndex::open(&imprints::path_for(&database)).expect("the imprint index");
    // The indexer reads the archive through a connection of its own, as in the server.
    let archive = rusqlite::Connection::open(&database).expect("the archive database");
    // What the appends above wrote first (also untimed).
    while index
        .catch_up(&archive, INDEX_STEP)
        .expect("catch_up")
        .worked
    {}
    group.throughput(Throughput::Elements(INDEX_STEP as u64));
    group.bench_function(BenchmarkId::new("3_index", INDEX_STEP), |b| {
        b.iter_batched(
            || {
                for _ in 0..INDEX_STEP / 256 {
                    store
                        .append(INSTANCE, &records.chained(256), &[])
                        .expect("append");
                }
            },
            |()| {
                // The new run, and the merges it fills up (amortized over the iterations).
                while index
                    .catch_up(&archive, INDEX_STEP)
                    .expect("catch_up")
                    .worked
                {}
            },
            criterion::BatchSize::PerIteration,
        )
    });
    // A look-up by imprint: every run of the index, then the record in the archive.
    let last = records.chained(1).pop().expect("a record");
    store
        .append(INSTANCE, std::slice::from_ref(&last), &[])
        .expect("append");
    while index
        .catch_up(&archive, INDEX_STEP)
        .expect("catch_up")
        .worked
    {}
    group.throughput(Throughput::Elements(1));
    group.bench_function("4_lookup_by_imprint", |b| {
        b.iter(|| {
            // As the admin listener asks: the latest one, and a count.
            let found = store
                .records_by_imprint(&last.record.imprint, 1)
                .expect("a look-up");
            assert_eq!(found.total, 1);
            assert_eq!(found.records[0].hash, last.hash);
        })
    });

    // The token log, one imprint in four the same: the SHA-256 of nothing.
    let log_dir = tempfile::tempdir().expect("a temporary directory");
    let mut db = SqliteStore::open(
        &log_dir.path().join("archive.sqlite"),
        std::time::Duration::from_secs(5),
    )
    .expect("the archive database");
    db.settle_layout(Layout::Log).expect("a new archive");
    let mut log = LogStore::open(db).with_segment_limit(LOG_SEGMENT);
    let empty = sha256(b"").to_vec();
    let mut frequent_last = None;
    let mut records = Records::new(token);
    for _ in 0..LOG_RECORDS / LOG_COMMIT {
        let batch = records.chained_with(LOG_COMMIT, |counter, r| {
            if counter % 4 == 0 {
                r.imprint.clone_from(&empty);
            }
        });
        log.append(INSTANCE, &batch, &[]).expect("append");
        log.after_append();
        frequent_last = batch
            .iter()
            .rfind(|r| r.record.imprint == empty)
            .map(|r| r.hash)
            .or(frequent_last);
    }
    let frequent_last = frequent_last.expect("records with the imprint");
    // Each iteration takes milliseconds: fewer samples.
    group.sample_size(20);
    for limit in [1usize, 100] {
        group.bench_with_input(
            BenchmarkId::new("4_lookup_frequent_in_log", limit),
            &limit,
            |b, &limit| {
                b.iter(|| {
                    let found = log.records_by_imprint(&empty, limit).expect("a look-up");
                    assert_eq!(found.total, LOG_MATCHES);
                    assert_eq!(found.records.len(), limit);
                    assert_eq!(found.records[0].hash, frequent_last);
                })
            },
        );
    }
    group.finish();

    // What went in reads back whole: the last record, by its serial.
    let back = store
        .record_by_serial(&last.record.serial)
        .expect("a look-up")
        .expect("the record");
    assert_eq!(back.record.token, last.record.token);
    assert_eq!(back.hash, last.hash);
    c.final_summary();
}
