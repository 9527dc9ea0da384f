//! How many tokens a second the archive's writer can commit, and what it costs it: the
//! ceiling the archive puts on a server with many cores, where the one writer thread, not the
//! signatures, is what bounds it (`docs/performance.md`, "The archive over cores").
//!
//! A real [`Archive`] (token log layout, in a temporary directory on the disk that holds it,
//! its queue, writer and group commit as in the server) is fed by C tasks on a tokio runtime
//! of one worker thread, each archiving a record of a real token (as `benches/archive.rs`
//! makes them) and waiting for its commit, then the next, for D seconds. Printed per C:
//! records committed a second; CPU per record (user + system, from
//! `/proc/self/task/<tid>/stat`) of the writer thread, of the token log's syncer (which makes
//! each commit durable and answers its requests while the writer chains the next) and of the
//! rest of the process (the tasks, the runtime); and records per commit. With a core each,
//! the writer and the syncer could commit about 1 / max(their CPU per record) records a
//! second, were the disk not slower.
//!
//! ```sh
//! cargo bench --bench archive_writer            # C = 32, 256, 1024; 5 s each, 2 rounds
//! WRITER_CONNS="256" WRITER_SECONDS=8 cargo bench --bench archive_writer
//! ```
//!
//! `commit_delay_us` is the server's default for this machine's cores unless
//! `WRITER_COMMIT_DELAY_US` sets it. Under `cargo test --benches` it makes one short run.

// The chains of records are for the other archive benchmarks.
#[allow(dead_code)]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tsa::archive::{Archive, CheckpointSigner};
use tsa::config::ArchiveConfig;

use common::{real_token, Records, INSTANCE};

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let conns: Vec<usize> = std::env::var("WRITER_CONNS")
        .ok()
        .map(|v| {
            v.split_whitespace()
                .map(|c| c.parse().expect("a count"))
                .collect()
        })
        .unwrap_or_else(|| if bench { vec![32, 256, 1024] } else { vec![32] });
    let seconds: f64 = std::env::var("WRITER_SECONDS")
        .ok()
        .map(|v| v.parse().expect("seconds"))
        .unwrap_or(if bench { 5.0 } else { 0.5 });
    let rounds = if bench { 2 } else { 1 };
    let token = real_token();
    println!(
        "{:>6} {:>12} {:>14} {:>14} {:>14} {:>12}",
        "conns", "records/s", "writer µs/rec", "syncer µs/rec", "others µs/rec", "per commit"
    );
    for _ in 0..rounds {
        for &c in &conns {
            run(&token, c, Duration::from_secs_f64(seconds));
        }
    }
}

fn run(token: &[u8], conns: usize, duration: Duration) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = ArchiveConfig {
        enabled: true,
        database: dir.path().join("archive.sqlite"),
        state_file: dir.path().join("archive.state"),
        instance_id: INSTANCE,
        checkpoint_interval_s: 3600,
        commit_delay_us: std::env::var("WRITER_COMMIT_DELAY_US")
            .ok()
            .map(|v| v.parse().expect("microseconds")),
        ..ArchiveConfig::default()
    };
    let signer = CheckpointSigner {
        sign: Box::new(|_| Ok(vec![1])),
        algorithm: vec![0x30, 0x00],
        certificate: vec![0x30, 0x00],
    };
    let archive = Arc::new(Archive::open(&config, signer, 4 * conns).expect("the archive"));
    // A new thread takes its name once it runs.
    let writer = (0..100)
        .find_map(|_| {
            thread_named("tsa-archive").or_else(|| {
                std::thread::sleep(Duration::from_millis(10));
                None
            })
        })
        .expect("the writer thread");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .expect("a runtime");
    let records = Arc::new(std::sync::Mutex::new(Records::new(token.to_vec())));
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    // Commits before the measurement: the log's first segment and its spare made.
    let warm = Duration::from_millis(300);
    runtime.block_on(async {
        let tasks: Vec<_> = (0..conns)
            .map(|_| {
                let (archive, records, stop, committed) = (
                    archive.clone(),
                    records.clone(),
                    stop.clone(),
                    committed.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let record = records.lock().expect("records").next_record();
                        archive.record(record).await.expect("committed");
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        tokio::time::sleep(warm).await;
        // Started with the first commit (absent with another layout).
        let syncer = thread_named("tsa-log-sync");
        let syncer_cpu = || syncer.map_or(Duration::ZERO, thread_cpu);
        let cpu_before = process_cpu();
        let writer_before = thread_cpu(writer);
        let syncer_before = syncer_cpu();
        let count_before = committed.load(Ordering::Relaxed);
        let commits_before = commit_count(&archive);
        let started = Instant::now();
        tokio::time::sleep(duration).await;
        let elapsed = started.elapsed();
        let count = committed.load(Ordering::Relaxed) - count_before;
        let cpu = process_cpu() - cpu_before;
        let writer_cpu = thread_cpu(writer) - writer_before;
        let syncer_cpu = syncer_cpu() - syncer_before;
        let commits = commit_count(&archive) - commits_before;
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.expect("a task");
        }
        let per = |d: Duration| d.as_secs_f64() * 1e6 / count as f64;
        println!(
            "{conns:>6} {:>12.0} {:>14.2} {:>14.2} {:>14.2} {:>12.1}",
            count as f64 / elapsed.as_secs_f64(),
            per(writer_cpu),
            per(syncer_cpu),
            per(cpu.saturating_sub(writer_cpu + syncer_cpu)),
            count as f64 / commits.max(1) as f64,
        );
    });
    archive.close();
}

/// Commits so far, from the writer's histogram of records per commit.
fn commit_count(archive: &Archive) -> u64 {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;
    let mut registry = Registry::default();
    registry.register(
        "records",
        "records per commit",
        archive.commit_stats().records.clone(),
    );
    let mut text = String::new();
    encode(&mut text, &registry).expect("encoded");
    text.lines()
        .find_map(|l| l.strip_prefix("records_count "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the histogram's count")
}

/// The id of this process's thread named `name`.
fn thread_named(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc/self/task").ok()?.find_map(|e| {
        let e = e.ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == name).then(|| e.file_name().to_str()?.parse().ok())?
    })
}

/// User + system CPU of thread `tid` of this process.
fn thread_cpu(tid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
    ticks(&stat)
}

/// User + system CPU of this process.
fn process_cpu() -> Duration {
    ticks(&std::fs::read_to_string("/proc/self/stat").expect("stat"))
}

/// utime + stime (fields 14 and 15) of a `stat` line, in clock ticks of 10 ms.
fn ticks(stat: &str) -> Duration {
    // The command name, in parentheses, may hold spaces: count fields after it.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}
