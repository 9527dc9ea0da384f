//! Crash safety of the archive: under load from several client threads, `tsa serve` is killed
//! with SIGKILL again and again and restarted on the same state directory. Afterwards no
//! serial is in the archive twice, every token a client received is archived byte for byte,
//! each run's counters are above every earlier run's, genTimes never go back across a
//! restart, every record is found by its imprint, and the chain (with its signed
//! checkpoints) verifies.

mod archive_support;

use std::time::{Duration, Instant};

use archive_support::{
    archive_cli, archived_records, assert_layout, check_received, database, init, open_store,
    stamp, Conn, Load, Received, Serving,
};
use tsa::archive::imprints;
use tsa::archive::record::StoredRecord;

const ROUNDS: usize = 20;
/// The most rounds the token log's run goes on to close three segments.
const MAX_LOG_ROUNDS: usize = 10 * ROUNDS;
const CLIENTS: usize = 4;

/// A small deterministic generator for the time each round runs before the kill.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[test]
fn kill_9_under_load_never_reuses_a_serial_nor_loses_a_token() {
    kill_9_rounds("rows");
}

#[test]
fn kill_9_under_load_never_reuses_a_serial_nor_loses_a_token_with_the_token_log() {
    kill_9_rounds("log");
}

/// The token log's segment files in `d`, in order.
fn log_segments(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(d.join("archive.tokens/0")) else {
        return Vec::new();
    };
    let mut segments: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    segments
}

/// Kills the server under load, round after round, on an archive of `layout`.
fn kill_9_rounds(layout: &str) {
    let started = Instant::now();
    // Small blocks: reservations happen all the time, also at the moment of the kill.
    let dir = init(&format!(
        "serial_block = 40\ncheckpoint_interval_s = 1\nlayout = \"{layout}\"\nlog_segment_mib = 1"
    ));
    let d = dir.path();
    let mut rng = Lcg(0x5eed ^ std::process::id() as u64);
    // Per round: the tokens the clients received.
    let mut received: Vec<Vec<Received>> = Vec::new();

    // The token log's rounds go on until the kills have come across segments closing (on a
    // slow machine 20 rounds may archive less than three segments), up to a cap far above
    // what any machine needs.
    let mut round = 0;
    while round < ROUNDS || (layout == "log" && log_segments(d).len() < 3 && round < MAX_LOG_ROUNDS)
    {
        let server = Serving::start(d);
        let load = Load::start(&server.public, CLIENTS, &format!("round {round}"));
        std::thread::sleep(Duration::from_millis(80 + rng.below(220)));
        server.kill();
        received.push(load.stop());
        round += 1;
    }
    // A last, clean run: its shutdown signs a checkpoint over everything.
    let server = Serving::start(d);
    let mut conn = Conn::connect(&server.public).unwrap();
    let last = stamp(&mut conn, b"after the crashes").unwrap().unwrap();
    server.stop();
    received.push(vec![last]);

    let total: usize = received.iter().map(Vec::len).sum();
    let with_tokens = received.iter().filter(|r| !r.is_empty()).count();
    assert!(
        with_tokens >= ROUNDS / 2,
        "too few rounds issued anything ({with_tokens})"
    );

    // No serial twice, every received token archived, each round's counters above the last.
    let records = archived_records(d);
    assert_layout(d, layout);
    check_received(&records, &received);
    let mut store = open_store(d);

    // Every record is found by its imprint: through the imprint index, which each kill
    // interrupted somewhere, and above its watermark through the archive itself.
    for r in &records {
        let found = store.records_by_imprint(&r.record.imprint, 10).unwrap();
        assert!(
            found
                .records
                .iter()
                .any(|f| f.seq == r.seq && f.hash == r.hash),
            "record {} is not found by its imprint",
            r.seq
        );
        assert_eq!(found.total, 1, "every request stamped other data");
        assert_eq!(found.records.len(), 1);
    }
    // Each start indexes what the runs before archived, so the index holds most of them (the
    // token log keeps imprint files per closed segment instead: these runs fill only one).
    if layout == "rows" {
        let index = imprints::ImprintIndex::open_read_only(&imprints::path_for(&database(d)))
            .unwrap()
            .expect("the imprint index")
            .lookup(&records[0].record.imprint)
            .unwrap();
        assert_eq!(
            index.positions,
            vec![(records[0].instance_id, records[0].seq)]
        );
        let mark = index.watermarks[&records[0].instance_id];
        eprintln!("imprint index: {mark} of {} records", records.len());
        assert!(
            mark * 2 > records.len() as u64,
            "only {mark} of {} records indexed",
            records.len()
        );
    } else {
        let imprint_index = imprints::path_for(&database(d));
        assert!(
            !imprint_index.exists(),
            "the token log has no imprint database"
        );
        // Segments of 1 MiB: the kills came across segments closing, too.
        let segments = log_segments(d);
        eprintln!("{} segments", segments.len());
        assert!(
            segments.len() >= 3,
            "{round} rounds archived fewer than three segments: {segments:?}"
        );
        for closed in &segments[..segments.len() - 1] {
            assert!(
                closed.with_extension("imp").exists(),
                "{}",
                closed.display()
            );
        }
    }

    // Runs, from the archive's own start events: each start's first counter is above every
    // counter of the runs before, and its genTimes after theirs.
    let opened: Vec<serde_json::Value> = store
        .events(0, u64::MAX)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "archive_opened")
        .map(|e| serde_json::from_str(&e.fields).unwrap())
        .collect();
    assert_eq!(opened.len(), round + 1);
    let field = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    let mut max_counter = 0u64;
    let mut max_gen = 0u64;
    for (k, start) in opened.iter().enumerate() {
        let (first, floor, head) = (
            field(start, "first_counter"),
            field(start, "gen_time_floor_ns"),
            field(start, "head_seq"),
        );
        assert!(
            first > max_counter,
            "run {k} starts at counter {first}, not above {max_counter}"
        );
        assert!(
            floor >= max_gen,
            "run {k}: genTime floor {floor} below {max_gen}"
        );
        let end = opened
            .get(k + 1)
            .map_or(u64::MAX, |next| field(next, "head_seq"));
        let run: Vec<&StoredRecord> = records
            .iter()
            .filter(|r| r.seq > head && r.seq <= end)
            .collect();
        for r in &run {
            assert!(
                r.counter >= first,
                "run {k}: counter {} below its start {first}",
                r.counter
            );
            assert!(
                r.record.gen_time_ns > max_gen,
                "run {k}: genTime {} not after the earlier runs' {max_gen}",
                r.record.gen_time_ns
            );
        }
        if let Some(m) = run.iter().map(|r| r.counter).max() {
            max_counter = max_counter.max(m);
        }
        if let Some(m) = run.iter().map(|r| r.record.gen_time_ns).max() {
            max_gen = max_gen.max(m);
        }
        // Each run's counters stay within what was reserved before it ended.
        max_counter = max_counter.max(first);
    }
    // The chain survived every kill, and the last checkpoint covers it.
    let (ok, report) = archive_cli(d, &["verify"]);
    assert!(ok, "{report}");
    assert!(report.contains(": OK"), "{report}");

    eprintln!(
        "{round} kills ({layout}): {} tokens archived, {total} received by clients, in {:.1} s",
        records.len(),
        started.elapsed().as_secs_f64()
    );
}
