//! The token archive with a real server, real SQLite and the real openssl on loopback:
//! complete records, look-ups over HTTP and the CLI, export, events, signed checkpoints and
//! `tsa archive verify`; tampering found at the right record; pruning that keeps the rest
//! verifiable; an unwritable archive, or serials that cannot be reserved, withholding tokens;
//! one server per state directory.

mod archive_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use archive_support::{
    archive_cli, archived_records, chained, database, get, get_with_header, hex, init,
    one_checkpoint_per_position, open_store, stamp, stamp_query, Conn, Received, Serving,
};
use rusqlite::params;
use tsa::alg::DigestAlgorithm;
use tsa::archive::record::{record_hash, StoredRecord};
use tsa::archive::serial::layout;
use tsa::archive::store::ArchiveStore;
use tsa::client::Query;
use tsa::protocol::FailInfo;

const DEVELOPMENT_POLICY: &str = "1.3.6.1.4.1.32473.3161.1";
const SHA256: &str = "2.16.840.1.101.3.4.2.1";

fn stamps(server: &Serving, n: usize, tag: &str) -> Vec<Received> {
    let mut conn = Conn::connect(&server.public).unwrap();
    (0..n)
        .map(|i| {
            stamp(&mut conn, format!("{tag} {i}").as_bytes())
                .unwrap()
                .expect("granted")
        })
        .collect()
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Every record all there, equal to what the client received; look-ups by serial and imprint
/// over HTTP and the CLI; export; events; a signed checkpoint at shutdown; verify is green.
#[test]
fn records_are_complete_refetchable_and_verify() {
    complete_refetchable_and_verified("rows");
}

#[test]
fn records_are_complete_refetchable_and_verify_with_the_token_log() {
    complete_refetchable_and_verified("log");
}

fn complete_refetchable_and_verified(layout: &str) {
    let dir = init(&format!(
        "checkpoint_interval_s = 3600\nlayout = \"{layout}\""
    ));
    let d = dir.path();
    let server = Serving::start(d);

    // With the real openssl: a SHA-512 query without nonce, and a SHA-256 one with a nonce.
    std::fs::write(d.join("data.txt"), b"archived by openssl").unwrap();
    openssl(
        d,
        &[
            "ts",
            "-query",
            "-data",
            "data.txt",
            "-sha512",
            "-no_nonce",
            "-cert",
            "-out",
            "a.tsq",
        ],
    );
    openssl(
        d,
        &[
            "ts", "-query", "-data", "data.txt", "-sha256", "-cert", "-out", "b.tsq",
        ],
    );
    let mut conn = Conn::connect(&server.public).unwrap();
    let mut replies = Vec::new();
    for q in ["a.tsq", "b.tsq"] {
        let (status, body) = conn
            .request("POST", "/", &std::fs::read(d.join(q)).unwrap())
            .unwrap();
        assert_eq!(status, 200);
        let tsr = q.replace(".tsq", ".tsr");
        std::fs::write(d.join(&tsr), &body).unwrap();
        replies.push(body);
    }
    let ours = stamps(&server, 3, "crate client");

    let mut store = open_store(d);
    // The openssl replies: imprint, algorithm, nonce as sent.
    for (i, reply) in replies.iter().enumerate() {
        let response = tsa::client::read::Response::from_der(reply).unwrap();
        let token = response.token.unwrap();
        let tst = token.tst_info();
        let r = store
            .record_by_serial(tst.serial_number.as_bytes())
            .unwrap()
            .expect("archived");
        assert_eq!(r.response(), *reply, "the archived token is the one sent");
        assert_eq!(r.record.token, token.der);
        let (alg, len) = if i == 0 {
            ("2.16.840.1.101.3.4.2.3", 64)
        } else {
            (SHA256, 32)
        };
        assert_eq!(r.record.imprint_alg, alg);
        assert_eq!(r.record.imprint.len(), len);
        assert_eq!(r.record.nonce.is_some(), i == 1);
    }
    // The crate's client: every column.
    for got in &ours {
        let r = store.record_by_serial(&got.serial).unwrap().unwrap();
        let rec = &r.record;
        assert_eq!(rec.token, got.token);
        assert_eq!(rec.gen_time_ns, got.gen_time_ns);
        assert_eq!(rec.imprint, got.imprint);
        assert_eq!(rec.imprint_alg, SHA256);
        assert_eq!(rec.nonce, got.nonce);
        assert_eq!(rec.policy, DEVELOPMENT_POLICY);
        assert_eq!(rec.client, None);
        assert_eq!(rec.clock.source, "development");
        assert_eq!(rec.clock.state, "synchronized");
        assert_eq!(rec.clock.bound_ns, 100_000_000);
        assert!(rec.accuracy_ns >= 100_000_000);
        assert_eq!(layout::decode(&rec.serial), Some((0, r.counter)));
        assert_eq!(r.hash, r.computed_hash());
    }
    let count = archived_records(d).len();
    assert_eq!(count, 5);

    // HTTP look-ups on the admin listener; openssl verifies what comes back.
    let serial_hex = hex(&ours[1].serial);
    let (status, body) = get(&server.admin, &format!("/archive/serial/{serial_hex}"));
    assert_eq!((status, &body), (200, &ours[1].response));
    let (status, body) = get(
        &server.admin,
        &format!("/archive/serial/{}", serial_hex.to_uppercase()),
    );
    assert_eq!((status, &body), (200, &ours[1].response));
    let imprint_sha512 = {
        let r = tsa::client::read::Response::from_der(&replies[0]).unwrap();
        hex(r
            .token
            .unwrap()
            .tst_info()
            .message_imprint
            .hashed_message
            .as_bytes())
    };
    let (status, body) = get(&server.admin, &format!("/archive/imprint/{imprint_sha512}"));
    assert_eq!((status, &body), (200, &replies[0]));
    std::fs::write(d.join("fetched.tsr"), &body).unwrap();
    openssl(
        d,
        &[
            "ts",
            "-verify",
            "-in",
            "fetched.tsr",
            "-queryfile",
            "a.tsq",
            "-CAfile",
            "ca-cert.pem",
        ],
    );
    assert_eq!(get(&server.admin, "/archive/serial/0102030405").0, 404);
    assert_eq!(
        get(
            &server.admin,
            &format!("/archive/imprint/{}", "00".repeat(32))
        )
        .0,
        404
    );
    assert_eq!(get(&server.admin, "/archive/serial/xyz").0, 400);
    assert_eq!(get(&server.admin, "/health/ready").0, 200);

    // The CLI while the server runs.
    let cli_tsr = d.join("cli.tsr");
    let (ok, out) = archive_cli(
        d,
        &[
            "get",
            "--serial",
            &serial_hex,
            "--out",
            cli_tsr.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("development synchronized"), "{out}");
    assert_eq!(std::fs::read(d.join("cli.tsr")).unwrap(), ours[1].response);
    let (ok, out) = archive_cli(d, &["get", "--serial", "0102"]);
    assert!(!ok && out.contains("no such token"), "{out}");
    // As `openssl ts -reply -text` prints it; a sign is no hex digit.
    let openssl_form = format!("0x{}", serial_hex.trim_start_matches('0').to_uppercase());
    let (ok, out) = archive_cli(d, &["get", "--serial", &openssl_form]);
    assert!(
        ok && out.contains("development synchronized"),
        "{openssl_form}: {out}"
    );
    let (ok, out) = archive_cli(d, &["get", "--serial", "+a"]);
    assert!(!ok && out.contains("not hex"), "{out}");

    // SIGTERM: a last checkpoint, signed with the TSU key.
    server.stop();
    if layout == "log" {
        // The writer kept room after its commits: zeros written ahead of the frames (LAYOUT.md,
        // "Room"), which verification, export and look-ups below read past.
        let instance = database(d).with_extension("tokens").join("0");
        let segments: Vec<_> = std::fs::read_dir(&instance)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        assert_eq!(segments.len(), 1, "{segments:?}");
        let octets = std::fs::read(&segments[0]).unwrap();
        let zeros = octets.iter().rev().take_while(|&&b| b == 0).count();
        assert!(
            octets.len() >= 1 << 20 && zeros >= 1 << 19 && zeros < octets.len(),
            "{zeros} trailing zeros in {} octets",
            octets.len()
        );
    }
    let mut store = open_store(d);
    let checkpoints = store.checkpoints(0).unwrap();
    assert_eq!(checkpoints.len(), 1);
    assert_eq!(checkpoints[0].seq, 5);
    let (ok, out) = archive_cli(d, &["verify"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("instance 0: 5 records verified, up to 5")
            && out.contains("1 signed checkpoints"),
        "{out}"
    );
    // And where the imprint index stands (derived data, told, not verified).
    let imprints = match layout {
        "rows" => "archive.imprints.sqlite (derived, rebuilt when needed): instance 0 up to record",
        _ => "imprint files of the token log (derived, written as each segment closes): 0 of 0",
    };
    assert!(
        out.contains(imprints) && (layout != "rows" || out.contains(" of 5; ")),
        "{out}"
    );
    // The checkpoint's signature checks with openssl too (ECDSA P-256 with SHA-256).
    std::fs::write(d.join("cp.msg"), checkpoints[0].message()).unwrap();
    std::fs::write(d.join("cp.sig"), &checkpoints[0].signature).unwrap();
    openssl(
        d,
        &[
            "x509",
            "-in",
            "tsa-cert.pem",
            "-pubkey",
            "-noout",
            "-out",
            "pub.pem",
        ],
    );
    openssl(
        d,
        &[
            "dgst",
            "-sha256",
            "-verify",
            "pub.pem",
            "-signature",
            "cp.sig",
            "cp.msg",
        ],
    );

    // Events: the key loaded at start-up, the development clock, the archive's own start.
    let (ok, out) = archive_cli(d, &["events"]);
    assert!(ok, "{out}");
    for kind in ["key_loaded", "development_clock", "archive_opened"] {
        assert!(out.contains(kind), "{kind} missing:\n{out}");
    }

    // Export by genTime: everything, then only the crate client's three.
    let from = ours[0].gen_time_ns / 1_000_000_000;
    let all = d.join("all");
    let (ok, out) = archive_cli(
        d,
        &[
            "export",
            "--from",
            "0",
            "--to",
            "4000000000",
            "--dir",
            all.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(std::fs::read_dir(d.join("all")).unwrap().count(), 5);
    for got in &ours {
        let file = d.join("all").join(format!("{}.tsr", hex(&got.serial)));
        assert_eq!(std::fs::read(file).unwrap(), got.response);
    }
    let rfc3339 = |ns: u64| {
        chrono::DateTime::from_timestamp_nanos(ns as i64)
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
    };
    let (ok, out) = archive_cli(
        d,
        &[
            "export",
            "--from",
            &rfc3339(ours[0].gen_time_ns),
            "--to",
            &rfc3339(ours[2].gen_time_ns + 1),
            "--jsonl",
            d.join("some.jsonl").to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(d.join("some.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "from {from}");
    for (line, got) in lines.iter().zip(&ours) {
        assert_eq!(line["serial"], hex(&got.serial));
        assert_eq!(line["token"], hex(&got.token));
        assert_eq!(line["clock"]["state"], "synchronized");
    }
}

/// A checkpoint signed again at its position with later events replaces the one there, in
/// both SQLite layouts (PostgreSQL: tests/archive_postgres.rs).
#[test]
fn checkpoints_signed_again_with_later_events_replace_theirs() {
    use tsa::archive::sqlite::{Layout, SqliteStore};
    for layout in [Layout::Rows, Layout::Log] {
        let dir = tempfile::tempdir().unwrap();
        let mut db =
            SqliteStore::open(&dir.path().join("archive.sqlite"), Duration::from_secs(5)).unwrap();
        db.settle_layout(layout).unwrap();
        let mut store: Box<dyn ArchiveStore> = match layout {
            Layout::Rows => Box::new(db),
            Layout::Log => Box::new(tsa::archive::log::LogStore::open(db)),
        };
        let records = chained(0, 3);
        store.append(0, &records, &[]).unwrap();
        one_checkpoint_per_position(store.as_mut(), &records);
    }
}

/// The events of an idle server (a sync lost at night, a key event) are signed at the next
/// checkpoint interval, by the checkpoint at the last token's position signed again: they do
/// not wait for the next token to be vouched for.
#[test]
fn an_idle_servers_events_are_signed_without_a_token() {
    let dir = init("checkpoint_interval_s = 1\nlayout = \"rows\"");
    let d = dir.path();
    let server = Serving::start(d);
    stamps(&server, 2, "idle");
    let conn = write_conn(d);
    let wait_for = |what: &str, query: &str, done: &dyn Fn(u64) -> bool| -> u64 {
        let start = Instant::now();
        loop {
            let found: Option<u64> = conn.query_row(query, [], |r| r.get(0)).unwrap();
            match found {
                Some(v) if done(v) => return v,
                _ if start.elapsed() > Duration::from_secs(20) => {
                    panic!("{what}: not after 20 s ({found:?})")
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    };
    let signed_events = "SELECT MAX(events_seq) FROM checkpoints WHERE seq = 2";
    wait_for("a checkpoint at 2", signed_events, &|_| true);
    // The checkpoint as it is before the reload, for the rollback below.
    let columns = "time_ns, algorithm, signature, certificate, events_seq, events_hash, anchor_seq";
    let before: Vec<rusqlite::types::Value> = conn
        .query_row(
            &format!("SELECT {columns} FROM checkpoints WHERE seq = 2"),
            [],
            |r| (0..7).map(|i| r.get(i)).collect(),
        )
        .unwrap();
    // A reload: an event, and no token after it.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.pid(), libc::SIGHUP) };
    let reloaded = wait_for(
        "the reload's event",
        "SELECT MAX(seq) FROM events WHERE kind = 'certificate_reloaded'",
        &|_| true,
    );
    wait_for("the reload signed", signed_events, &|seq| seq >= reloaded);
    let positions: Vec<u64> = conn
        .prepare("SELECT seq FROM checkpoints ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(positions.last(), Some(&2), "a token came: {positions:?}");
    server.stop();
    let report = verify_report(d).unwrap_or_else(|e| panic!("{e}"));
    let line = |start: &str| -> String {
        let found = report.lines().find(|l| l.trim_start().starts_with(start));
        found.unwrap_or_else(|| panic!("{report}")).trim_start()[start.len()..].to_string()
    };
    assert!(line("events:").ends_with(": OK"), "{report}");
    // The events' head to keep elsewhere: the server logged it too.
    let head = line("events head: ");
    let (ok, events) = archive_cli(d, &["events"]);
    assert!(ok && events.contains(&head), "{head}: {events}");
    assert_eq!(verify_status(d, &["--expect-events", &head]).0, Some(0));

    // The checkpoint put back as it was before the reload, the events after it deleted:
    // nothing on the disk tells, the head kept elsewhere does.
    let old_events = match before[4] {
        rusqlite::types::Value::Integer(seq) => seq,
        ref other => panic!("{other:?}"),
    };
    conn.execute("DELETE FROM events WHERE seq > ?1", [old_events])
        .unwrap();
    let set: Vec<String> = columns
        .split(", ")
        .enumerate()
        .map(|(i, c)| format!("{c} = ?{}", i + 1))
        .collect();
    conn.execute(
        &format!("UPDATE checkpoints SET {} WHERE seq = 2", set.join(", ")),
        rusqlite::params_from_iter(&before),
    )
    .unwrap();
    drop(conn);
    let (status, out) = verify_status(d, &["--strict"]);
    assert_eq!(status, Some(0), "nothing on the disk tells: {out}");
    let (status, out) = verify_status(d, &["--expect-events", &head]);
    assert_eq!(status, Some(1), "{out}");
    assert!(
        out.contains("events are missing at the end: the events' head expected")
            && out.contains("rolled back"),
        "{out}"
    );
    let (status, out) = verify_status(d, &["--expect-events", "0:5"]);
    assert_eq!(status, Some(2), "clap refuses a malformed head: {out}");
}

/// A server that has issued no token yet signs its events too, at position 0 (the empty
/// chain), in the default layout: they verify across a restart, an event rewritten with
/// every hash after it recomputed breaks, and the key of that checkpoint, vouched for by no
/// token yet, is a warning until a checkpoint of the same certificate over a token follows.
#[test]
fn a_server_without_tokens_signs_its_events() {
    let dir = init("checkpoint_interval_s = 1");
    let d = dir.path();
    let signed_at_0 = |d: &Path| -> Option<u64> {
        write_conn(d)
            .query_row(
                "SELECT MAX(events_seq) FROM checkpoints WHERE seq = 0",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    for _ in 0..2 {
        // The second start checks the chain against the checkpoint at 0, and signs again.
        let before = match database(d).exists() {
            true => signed_at_0(d).unwrap_or(0),
            false => 0,
        };
        let server = Serving::start(d);
        let start = Instant::now();
        while signed_at_0(d).unwrap_or(0) <= before {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no checkpoint at 0"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server.stop();
    }
    let (status, out) = verify_status(d, &[]);
    assert_eq!(status, Some(0), "{out}");
    assert!(out.contains("the last at 0"), "{out}");
    assert!(
        out.contains("the checkpoint before the first token"),
        "{out}"
    );
    let events = out
        .lines()
        .find(|l| l.trim_start().starts_with("events:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(events.ends_with(": OK"), "{out}");
    let head = out
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("events head: "))
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    assert_eq!(verify_status(d, &["--expect-events", &head]).0, Some(0));

    // The first event rewritten, every event's hash after it recomputed: each checks, but
    // the checkpoint at 0 signed another head.
    let snapshot = d.join("snapshot.sqlite");
    write_conn(d)
        .execute("VACUUM INTO ?1", [snapshot.to_str().unwrap()])
        .unwrap();
    let mut store = tsa::archive::sqlite::SqliteStore::open_read_only(&database(d)).unwrap();
    let all = store.events_from(0, 0, 10_000).unwrap();
    drop(store);
    let conn = write_conn(d);
    let mut prev = tsa::archive::record::ZERO_HASH;
    for (i, e) in all.into_iter().enumerate() {
        let mut e = e;
        if i == 0 {
            e.message = "edited".into();
        }
        let e = e.chained(prev);
        conn.execute(
            "UPDATE events SET message = ?1, prev_hash = ?2, body_hash = ?3, hash = ?4 \
             WHERE seq = ?5",
            params![
                e.message,
                &e.prev_hash.unwrap()[..],
                &e.body_hash.unwrap()[..],
                &e.hash.unwrap()[..],
                e.seq
            ],
        )
        .unwrap();
        prev = e.hash.unwrap();
    }
    drop(conn);
    let (status, out) = verify_status(d, &[]);
    assert_eq!(status, Some(1), "{out}");
    assert!(
        out.contains("the checkpoint at 0 signs the event at"),
        "{out}"
    );
    restore(d, &snapshot);

    // A token, and a checkpoint of the same certificate over it: the warning goes.
    let server = Serving::start(d);
    stamps(&server, 1, "first");
    server.stop();
    let (status, out) = verify_status(d, &[]);
    assert_eq!(status, Some(0), "{out}");
    assert!(
        !out.contains("the checkpoint before the first token"),
        "{out}"
    );
    assert_eq!(verify_status(d, &["--strict"]).0, Some(0), "{out}");
}

/// Runs `tsa archive verify`; on failure returns its report.
fn verify_report(dir: &Path) -> Result<String, String> {
    match archive_cli(dir, &["verify"]) {
        (true, out) => Ok(out),
        (false, out) => Err(out),
    }
}

fn write_conn(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(archive_support::database(dir)).unwrap()
}

fn serial_at(conn: &rusqlite::Connection, seq: u64) -> String {
    let serial: Vec<u8> = conn
        .query_row("SELECT serial FROM tokens WHERE seq = ?1", [seq], |r| {
            r.get(0)
        })
        .unwrap();
    hex(&serial)
}

/// Changing, deleting or re-hashing rows is reported at the record where it happened.
#[test]
fn tampering_is_reported_at_the_right_record() {
    // Rows: this edits the token rows (the log's own test is below).
    let dir = init("checkpoint_interval_s = 3600\nlayout = \"rows\"");
    let d = dir.path();
    let server = Serving::start(d);
    stamps(&server, 6, "tamper");
    server.stop();
    verify_report(d).expect("green before tampering");
    let conn = write_conn(d);

    // One column of one row, then put back.
    let cases: [(&str, u64, &str, &str); 4] = [
        (
            "imprint",
            4,
            "UPDATE tokens SET imprint = zeroblob(32) WHERE seq = 4",
            "column imprint differs",
        ),
        (
            "gen_time_ns",
            3,
            "UPDATE tokens SET gen_time_ns = gen_time_ns - 1000000 WHERE seq = 3",
            "column gen_time_ns differs",
        ),
        (
            "clock_state",
            2,
            "UPDATE tokens SET clock_state = 'holdover' WHERE seq = 2",
            "a column outside the token",
        ),
        (
            "nonce",
            5,
            "UPDATE tokens SET nonce = NULL WHERE seq = 5",
            "column nonce differs",
        ),
    ];
    for (column, seq, sql, expect) in cases {
        let original: rusqlite::types::Value = conn
            .query_row(
                &format!("SELECT {column} FROM tokens WHERE seq = ?1"),
                [seq],
                |r| r.get(0),
            )
            .unwrap();
        conn.execute(sql, []).unwrap();
        let report = verify_report(d).expect_err("tampering must be found");
        let serial = serial_at(&conn, seq);
        assert!(
            report.contains(&format!("BROKEN at record {seq} (serial {serial})"))
                && report.contains(expect),
            "{column}: {report}"
        );
        conn.execute(
            &format!("UPDATE tokens SET {column} = ?1 WHERE seq = ?2"),
            params![original, seq],
        )
        .unwrap();
        verify_report(d).expect("green once restored");
    }

    // The certificate set the tokens share (stored once): every token that carried it breaks.
    let set: Vec<u8> = conn
        .query_row("SELECT der FROM certificate_sets", [], |r| r.get(0))
        .unwrap();
    let mut changed = set.clone();
    *changed.last_mut().unwrap() ^= 1;
    conn.execute("UPDATE certificate_sets SET der = ?1", [&changed])
        .unwrap();
    let report = verify_report(d).unwrap_err();
    assert!(
        report.contains(&format!(
            "BROKEN at record 1 (serial {})",
            serial_at(&conn, 1)
        )) && report.contains("certificate set"),
        "{report}"
    );
    conn.execute("UPDATE certificate_sets SET der = ?1", [&set])
        .unwrap();
    let report = verify_report(d).expect("green once restored");

    // The events (the key loaded, the clock's, the archive's own) are chained and signed by
    // the checkpoints too: one changed, or one deleted, breaks them.
    let events = report
        .lines()
        .find(|l| l.trim_start().starts_with("events:"))
        .unwrap_or_else(|| panic!("{report}"));
    assert!(events.ends_with(": OK"), "{report}");
    let message: String = conn
        .query_row("SELECT message FROM events WHERE seq = 2", [], |r| r.get(0))
        .unwrap();
    conn.execute("UPDATE events SET message = 'edited' WHERE seq = 2", [])
        .unwrap();
    let report = verify_report(d).unwrap_err();
    assert!(
        report.contains("BROKEN at event 2") && report.contains("do not match its body hash"),
        "{report}"
    );
    conn.execute("UPDATE events SET message = ?1 WHERE seq = 2", [&message])
        .unwrap();
    // The events' head a checkpoint signs is in its signature.
    conn.execute("UPDATE checkpoints SET events_seq = events_seq - 1", [])
        .unwrap();
    let report = verify_report(d).unwrap_err();
    assert!(report.contains("has a bad signature"), "{report}");
    conn.execute("UPDATE checkpoints SET events_seq = events_seq + 1", [])
        .unwrap();
    let snapshot = d.join("events.sqlite");
    conn.execute("VACUUM INTO ?1", [snapshot.to_str().unwrap()])
        .unwrap();
    conn.execute("DELETE FROM events WHERE seq = 2", [])
        .unwrap();
    let report = verify_report(d).unwrap_err();
    assert!(
        report.contains("BROKEN at event 3") && report.contains("event 2 is missing"),
        "{report}"
    );
    drop(conn);
    restore(d, &snapshot);
    std::fs::remove_file(&snapshot).unwrap();
    let conn = write_conn(d);

    // A record deleted in the middle, and the last one (which the signed checkpoint covers).
    let snapshot = d.join("snapshot.sqlite");
    conn.execute("VACUUM INTO ?1", [snapshot.to_str().unwrap()])
        .unwrap();
    conn.execute("DELETE FROM tokens WHERE seq = 3", [])
        .unwrap();
    let report = verify_report(d).unwrap_err();
    assert!(
        report.contains("BROKEN at record 3") && report.contains("record 3 is missing"),
        "{report}"
    );
    drop(conn);
    restore(d, &snapshot);
    let conn = write_conn(d);
    conn.execute("DELETE FROM tokens WHERE seq = 6", [])
        .unwrap();
    let report = verify_report(d).unwrap_err();
    assert!(
        report.contains("records are missing at the end"),
        "{report}"
    );
    drop(conn);
    restore(d, &snapshot);

    // A forger who changes a row and recomputes every hash after it: the chain is consistent
    // again, but the signed checkpoint is not.
    let conn = write_conn(d);
    conn.execute("UPDATE tokens SET clock_bound_ns = 1 WHERE seq = 2", [])
        .unwrap();
    let mut store =
        tsa::archive::sqlite::SqliteStore::open_read_only(&archive_support::database(d)).unwrap();
    let mut records: Vec<StoredRecord> = Vec::new();
    store
        .for_each_record(0, 1, &mut |r| {
            records.push(r);
            Ok(true)
        })
        .unwrap();
    let mut prev = records[0].hash;
    for r in records.iter_mut().skip(1) {
        r.prev_hash = prev;
        r.hash = record_hash(r.instance_id, r.seq, r.counter, &r.record, &prev);
        conn.execute(
            "UPDATE tokens SET prev_hash = ?1, hash = ?2 WHERE seq = ?3",
            params![&r.prev_hash[..], &r.hash[..], r.seq],
        )
        .unwrap();
        prev = r.hash;
    }
    let report = verify_report(d).unwrap_err();
    assert!(
        report.contains("BROKEN at record 6") && report.contains("differs from the checkpoint"),
        "{report}"
    );
}

/// Rewrites the hashes of `records` (instance 0, rows) in chain order from `prev` on, in the
/// rows and in `records`; returns the last hash.
fn rehash(
    conn: &rusqlite::Connection,
    records: &mut [StoredRecord],
    mut prev: [u8; 32],
) -> [u8; 32] {
    for r in records {
        r.prev_hash = prev;
        r.hash = record_hash(r.instance_id, r.seq, r.counter, &r.record, &prev);
        conn.execute(
            "UPDATE tokens SET prev_hash = ?1, hash = ?2, client = ?3 WHERE seq = ?4",
            params![&r.prev_hash[..], &r.hash[..], r.record.client, r.seq],
        )
        .unwrap();
        prev = r.hash;
    }
    prev
}

/// The token log prunes whole segments and anchors at the last record of the last one removed:
/// an anchor written by hand in the middle of a segment (with its record's true hash) would
/// hide every record below it from verification, look-ups and exports.
#[test]
fn an_anchor_written_by_hand_in_a_log_segment_does_not_verify() {
    let dir = two_signed_runs("checkpoint_interval_s = 3600");
    let d = dir.path();
    let original = archived_records(d);
    assert!(original.len() >= 10);
    write_conn(d)
        .execute(
            "INSERT INTO chain_anchors (instance_id, seq, hash, max_counter, max_gen_time_ns, \
             pruned_at_ns) VALUES (0, 7, ?1, 0, 0, 0)",
            [&original[6].hash[..]],
        )
        .unwrap();
    let report = verify_report(d).expect_err("an anchor inside a segment");
    assert!(
        report.contains("BROKEN at record 1") && report.contains("at or below the anchor"),
        "{report}"
    );
}

/// An archive (`extra` under `[archive]`) of two server runs of five tokens each, with
/// checkpoints at 5 and 10 (each stop signs the head), green.
fn two_signed_runs(extra: &str) -> tempfile::TempDir {
    let dir = init(extra);
    for run in 0..2 {
        let server = Serving::start(dir.path());
        stamps(&server, 5, &format!("anchor {run}"));
        server.stop();
    }
    verify_report(dir.path()).expect("green before tampering");
    dir
}

/// The anchor row is no proof of what it stands for: records left at or below it are still
/// checked (they are not served as pruned), and an anchor must be reached from a signed
/// checkpoint at or after it.
#[test]
fn an_anchor_written_by_hand_does_not_verify() {
    let dir = two_signed_runs("checkpoint_interval_s = 3600\nlayout = \"rows\"");
    let d = dir.path();
    let snapshot = d.join("snapshot.sqlite");
    write_conn(d)
        .execute("VACUUM INTO ?1", [snapshot.to_str().unwrap()])
        .unwrap();
    let original = archived_records(d);

    // Record 3's client changed and the hashes of 3..7 recomputed; an anchor at 7 with the
    // new hash of 7, which record 8 now names (and its hash recomputed as well).
    let conn = write_conn(d);
    let mut records = original.clone();
    records[2].record.client = Some("someone else".into());
    let prev = records[1].hash;
    let last = rehash(&conn, &mut records[2..7], prev);
    conn.execute(
        "INSERT INTO chain_anchors (instance_id, seq, hash, max_counter, max_gen_time_ns, \
         pruned_at_ns) VALUES (0, 7, ?1, 0, 0, 0)",
        [&last[..]],
    )
    .unwrap();
    conn.execute(
        "UPDATE tokens SET prev_hash = ?1 WHERE seq = 8",
        [&last[..]],
    )
    .unwrap();
    let report = verify_report(d).expect_err("records below the anchor are read");
    assert!(
        report.contains("BROKEN at record 1") && report.contains("at or below the anchor"),
        "{report}"
    );
    drop(conn);
    restore(d, &snapshot);

    // Record 3's client changed, nothing recomputed; an anchor at 7 with 7's true hash.
    let conn = write_conn(d);
    conn.execute(
        "UPDATE tokens SET client = 'someone else' WHERE seq = 3",
        [],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO chain_anchors (instance_id, seq, hash, max_counter, max_gen_time_ns, \
         pruned_at_ns) VALUES (0, 7, ?1, 0, 0, 0)",
        [&original[6].hash[..]],
    )
    .unwrap();
    let report = verify_report(d).expect_err("records at or below the anchor must not remain");
    assert!(
        report.contains(&format!(
            "BROKEN at record 1 (serial {})",
            hex(&original[0].record.serial)
        )) && report.contains("at or below the anchor"),
        "{report}"
    );
    drop(conn);
    restore(d, &snapshot);

    // A copy of record 3 put in at position 0, without an anchor (a walk from position 1
    // passed over it, and look-ups by serial find it): out of place.
    let conn = write_conn(d);
    conn.execute_batch(
        "CREATE TEMP TABLE copy AS SELECT * FROM tokens WHERE seq = 3; \
         UPDATE copy SET seq = 0, counter = counter + 1000000; \
         INSERT INTO tokens SELECT * FROM copy;",
    )
    .unwrap();
    let report = verify_report(d).expect_err("a record at position 0");
    assert!(
        report.contains("BROKEN at record 0") && report.contains("positions begin at 1"),
        "{report}"
    );
    drop(conn);
    restore(d, &snapshot);

    // Records 1..7 gone under a forged anchor that 8..10 chain to, and the checkpoint at 10
    // deleted: only the checkpoint at 5, below the anchor, is left.
    let conn = write_conn(d);
    let forged = [0x5a; 32];
    let mut records = original.clone();
    records[7].record.client = Some("someone else".into());
    rehash(&conn, &mut records[7..], forged);
    conn.execute("DELETE FROM tokens WHERE seq <= 7", [])
        .unwrap();
    conn.execute("DELETE FROM checkpoints WHERE seq = 10", [])
        .unwrap();
    conn.execute(
        "INSERT INTO chain_anchors (instance_id, seq, hash, max_counter, max_gen_time_ns, \
         pruned_at_ns) VALUES (0, 7, ?1, 0, 0, 0)",
        [&forged[..]],
    )
    .unwrap();
    let report = verify_report(d).expect_err("an anchor no signed checkpoint reaches");
    assert!(
        report.contains("BROKEN at record 7") && report.contains("no signed checkpoint"),
        "{report}"
    );
}

/// `tsa archive verify <args>`: (exit status, stdout + stderr).
fn verify_status(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let args: Vec<&str> = std::iter::once("verify")
        .chain(args.iter().copied())
        .collect();
    archive_support::archive_cli_status(dir, &args)
}

/// The records after the last signed checkpoint are signed by no checkpoint: verify says so
/// (a failure with --strict), checks their tokens' own signatures, and finds records missing
/// at the end by the instance's highest archived counter. An emptied archive is no success
/// either.
#[test]
fn a_stripped_archive_does_not_pass_for_a_verified_one() {
    let dir = init("checkpoint_interval_s = 3600\nlayout = \"rows\"");
    let d = dir.path();
    let server = Serving::start(d);
    stamps(&server, 5, "signed");
    server.stop();
    // Killed: no checkpoint at shutdown, records 6..8 signed by none.
    let server = Serving::start(d);
    stamps(&server, 3, "unsigned");
    server.kill();
    let (status, out) = verify_status(d, &[]);
    assert_eq!(status, Some(0), "{out}");
    assert!(
        out.contains("8 records verified")
            && out.contains("WARNING")
            && out.contains("3 records after the last signed checkpoint"),
        "{out}"
    );
    let (status, out) = verify_status(d, &["--strict"]);
    assert_eq!(status, Some(2), "warnings fail with --strict: {out}");
    let snapshot = d.join("snapshot.sqlite");
    write_conn(d)
        .execute("VACUUM INTO ?1", [snapshot.to_str().unwrap()])
        .unwrap();
    let original = archived_records(d);

    // The last record deleted: no checkpoint counts it, the instance's row does.
    let conn = write_conn(d);
    conn.execute("DELETE FROM tokens WHERE seq = 8", [])
        .unwrap();
    let report = verify_report(d).expect_err("a record missing at the end");
    assert!(
        report.contains("records are missing at the end"),
        "{report}"
    );
    drop(conn);
    restore(d, &snapshot);

    // Record 7's token signature altered, its hash and 8's recomputed.
    let conn = write_conn(d);
    let stored: Vec<u8> = conn
        .query_row("SELECT token FROM tokens WHERE seq = 7", [], |r| r.get(0))
        .unwrap();
    let mut altered = stored.clone();
    *altered.last_mut().unwrap() ^= 1;
    conn.execute("UPDATE tokens SET token = ?1 WHERE seq = 7", [&altered])
        .unwrap();
    let mut records = original.clone();
    *records[6].record.token.last_mut().unwrap() ^= 1;
    let prev = records[5].hash;
    rehash(&conn, &mut records[6..], prev);
    let report = verify_report(d).expect_err("a token whose signature does not verify");
    assert!(
        report.contains(&format!(
            "BROKEN at record 7 (serial {})",
            hex(&original[6].record.serial)
        )) && report.contains("signature"),
        "{report}"
    );
    drop(conn);
    restore(d, &snapshot);

    // Every checkpoint deleted: a warning; the tokens' signatures are checked all the same.
    let conn = write_conn(d);
    conn.execute("DELETE FROM checkpoints", []).unwrap();
    let (status, out) = verify_status(d, &[]);
    assert_eq!(status, Some(0), "{out}");
    assert!(
        out.contains("no signed checkpoint") && out.contains("WARNING"),
        "{out}"
    );
    assert_eq!(verify_status(d, &["--strict"]).0, Some(2));

    // Emptied.
    for table in [
        "tokens",
        "checkpoints",
        "instances",
        "chain_anchors",
        "events",
    ] {
        conn.execute(&format!("DELETE FROM {table}"), []).unwrap();
    }
    let (status, out) = verify_status(d, &[]);
    assert_eq!(status, Some(0), "{out}");
    assert!(out.contains("WARNING") && out.contains("empty"), "{out}");
    assert_eq!(verify_status(d, &["--strict"]).0, Some(2));
}

/// A rollback of the whole archive to an earlier checkpoint (records, instance row and
/// checkpoints rewritten together) leaves nothing on the disk to tell, but a head kept
/// elsewhere (verify's `head:` line, the server's `archive_checkpoint` event) does; an
/// instance the auditor names, or the configuration's own, must be there.
#[test]
fn a_rollback_shows_against_a_head_kept_elsewhere() {
    let dir = init("checkpoint_interval_s = 3600\nlayout = \"rows\"");
    let d = dir.path();
    let server = Serving::start(d);
    let first = stamps(&server, 5, "kept");
    server.stop();
    let out = verify_report(d).unwrap();
    let head_line = |out: &str| -> String {
        let line = out.lines().find(|l| l.trim_start().starts_with("head: "));
        line.expect("a head line").trim_start()["head: ".len()..].to_string()
    };
    let head5 = head_line(&out);
    assert!(
        head5.starts_with("0:5:") && head5.len() == "0:5:".len() + 64,
        "{out}"
    );
    // The server logged the same head at its checkpoint, as an archive event too.
    let (ok, events) = archive_cli(d, &["events"]);
    assert!(
        ok && events.contains("archive_checkpoint") && events.contains(&head5),
        "{events}"
    );
    let server = Serving::start(d);
    stamps(&server, 3, "rolled back");
    server.stop();
    let out = verify_report(d).unwrap();
    let head8 = head_line(&out);
    assert!(head8.starts_with("0:8:"), "{out}");
    let expect = |head: &str| verify_status(d, &["--expect", head]);
    assert_eq!(expect(&head8).0, Some(0));
    assert_eq!(expect(&head5).0, Some(0), "an earlier head is in the chain");

    // Back to the checkpoint at 5: its records, the instance row, the checkpoints after it.
    let conn = write_conn(d);
    conn.execute("DELETE FROM tokens WHERE seq > 5", [])
        .unwrap();
    conn.execute("DELETE FROM checkpoints WHERE seq > 5", [])
        .unwrap();
    let counter = layout::decode(&first[4].serial).unwrap().1;
    conn.execute("UPDATE instances SET max_counter = ?1", [counter as i64])
        .unwrap();
    drop(conn);
    let (status, out) = verify_status(d, &["--strict"]);
    assert_eq!(status, Some(0), "nothing on the disk tells: {out}");
    let (status, out) = expect(&head8);
    assert_eq!(status, Some(1), "{out}");
    assert!(
        out.contains("before the expected head 8") && out.contains("rolled back"),
        "{out}"
    );
    // A head changed in place (its hash recomputed) does not match either.
    let mut other = head5.clone();
    let last = other.pop().unwrap();
    other.push(if last == '0' { '1' } else { '0' });
    let (status, out) = expect(&other);
    assert_eq!(status, Some(1), "{out}");
    assert!(out.contains("is not the expected head"), "{out}");
    let (status, out) = verify_status(d, &["--expect", "0:5:xyz"]);
    assert_eq!(status, Some(2), "clap refuses a malformed head: {out}");

    // An instance named, or one whose head is expected, that the archive does not hold.
    let (status, out) = verify_status(d, &["--instance", "7"]);
    assert_eq!(status, Some(1), "{out}");
    assert!(out.contains("instance 7: BROKEN"), "{out}");
    let (status, out) = expect(&format!("3{}", &head5[1..]));
    assert_eq!(status, Some(1), "{out}");
    assert!(out.contains("instance 3: BROKEN"), "{out}");
    // The configuration's own instance, once the archive holds another.
    let config = std::fs::read_to_string(d.join("tsa.toml")).unwrap();
    std::fs::write(d.join("tsa.toml"), format!("{config}instance_id = 4\n")).unwrap();
    let (status, out) = verify_status(d, &[]);
    assert_eq!(status, Some(0), "{out}");
    assert!(
        out.contains("WARNING: instance 4 (the configuration's) has nothing"),
        "{out}"
    );
    assert_eq!(verify_status(d, &["--strict"]).0, Some(2));
}

/// One who can rewrite the archive can put a certificate of their own in the configuration's
/// place and sign the checkpoints again with its key: the tokens at the checkpoints, signed
/// by the TSU key, no longer verify then, and an auditor's own copy of the TSU certificate
/// (`--trust`) refuses the checkpoints themselves.
#[test]
fn a_certificate_put_in_the_configurations_place_does_not_pass() {
    use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let dir = init("checkpoint_interval_s = 3600\nlayout = \"rows\"");
    let d = dir.path();
    // Two checkpoints, at 4 and 8 (each run's shutdown).
    for _ in 0..2 {
        let server = Serving::start(d);
        stamps(&server, 4, "signed");
        server.stop();
    }
    let auditors = d.join("auditors-copy.pem");
    std::fs::copy(d.join("tsa-cert.pem"), &auditors).unwrap();
    assert_eq!(verify_status(d, &["--strict"]).0, Some(0));
    // A CA certificate is no TSU's: not trusted for checkpoints, even when given.
    let ca = d.join("ca-cert.pem");
    let (status, out) = verify_status(d, &["--trust", ca.to_str().unwrap()]);
    assert_eq!(status, Some(1), "{out}");
    assert!(
        out.contains("is not trusted for checkpoints")
            && out.contains("no TSU certificate to trust"),
        "{out}"
    );

    // Another development PKI's TSU key and certificate (P-256, as the archive's).
    let other = tempfile::tempdir().unwrap();
    archive_support::init_in(other.path(), "");
    let key = tsa::pem::private_key(&other.path().join("tsa-key.pem")).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key.secret_der()).unwrap();
    let cert = tsa::pem::certificates(&other.path().join("tsa-cert.pem")).unwrap();
    let cert = cert[0].to_vec();
    let conn = write_conn(d);
    type Row = (i64, Vec<u8>, i64, i64, Vec<u8>, i64);
    let checkpoints: Vec<Row> = conn
        .prepare(
            "SELECT seq, head_hash, time_ns, events_seq, events_hash, anchor_seq \
             FROM checkpoints",
        )
        .unwrap()
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(!checkpoints.is_empty());
    let rng = aws_lc_rs::rand::SystemRandom::new();
    for (seq, hash, time_ns, events_seq, events_hash, anchor_seq) in checkpoints {
        let message = tsa::archive::record::checkpoint_message(
            0,
            seq as u64,
            &hash.try_into().unwrap(),
            time_ns as u64,
            Some((
                &tsa::archive::record::ChainHead {
                    seq: events_seq as u64,
                    hash: events_hash.try_into().unwrap(),
                },
                anchor_seq as u64,
            )),
        );
        let signature = key.sign(&rng, &message).unwrap();
        conn.execute(
            "UPDATE checkpoints SET signature = ?1, certificate = ?2 WHERE seq = ?3",
            params![signature.as_ref(), cert, seq],
        )
        .unwrap();
    }
    drop(conn);
    std::fs::copy(other.path().join("tsa-cert.pem"), d.join("tsa-cert.pem")).unwrap();
    let (status, out) = verify_status(d, &[]);
    assert_eq!(status, Some(1), "{out}");
    assert!(
        out.contains("does not verify with a trusted certificate")
            && out.contains("a signed checkpoint is at this record"),
        "{out}"
    );
    // The auditor's copy: the checkpoints' certificate is not trusted.
    let (status, out) = verify_status(d, &["--trust", auditors.to_str().unwrap()]);
    assert_eq!(status, Some(1), "{out}");
    assert!(
        out.contains("signed by a certificate that is not trusted"),
        "{out}"
    );

    // The certificate beside the configuration's, as a rollover's (both trusted): the tokens
    // verify with one, the checkpoints with the other, and no token with the checkpoints'.
    std::fs::copy(&auditors, d.join("tsa-cert.pem")).unwrap();
    std::fs::copy(other.path().join("tsa-cert.pem"), d.join("next-cert.pem")).unwrap();
    std::fs::copy(other.path().join("tsa-key.pem"), d.join("next-key.pem")).unwrap();
    let mut text = std::fs::read_to_string(d.join("tsa.toml")).unwrap();
    text.push_str(
        "\n[rollover]\nat = \"2020-01-01T00:00:00Z\"\n[rollover.signer]\nkind = \"software\"\n\
         key = \"next-key.pem\"\ncertificate = \"next-cert.pem\"\n",
    );
    std::fs::write(d.join("tsa.toml"), text).unwrap();
    let (status, out) = verify_status(d, &[]);
    assert_eq!(status, Some(1), "{out}");
    assert!(
        out.contains("BROKEN at record 4") && out.contains("signed neither"),
        "{out}"
    );
}

/// With a certificate of their own trusted beside the TSU's (as a rollover's), one who can
/// rewrite the archive could delete the oldest records and sign an anchor over them with its
/// key, and nothing showed (a pruning's anchor, checked by its signature alone). Its key
/// signed no token kept and no checkpoint after it: a warning, which --strict fails.
#[test]
fn an_anchor_signed_by_a_key_that_signs_nothing_else_is_a_warning() {
    use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let dir = init("checkpoint_interval_s = 3600\nlayout = \"rows\"");
    let d = dir.path();
    // Checkpoints at 4, 8 and 12 (each run's shutdown).
    for _ in 0..3 {
        let server = Serving::start(d);
        stamps(&server, 4, "kept");
        server.stop();
    }
    assert_eq!(verify_status(d, &["--strict"]).0, Some(0));

    let other = tempfile::tempdir().unwrap();
    archive_support::init_in(other.path(), "");
    let key = tsa::pem::private_key(&other.path().join("tsa-key.pem")).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key.secret_der()).unwrap();
    let cert = tsa::pem::certificates(&other.path().join("tsa-cert.pem")).unwrap()[0].to_vec();
    std::fs::copy(other.path().join("tsa-cert.pem"), d.join("next-cert.pem")).unwrap();
    std::fs::copy(other.path().join("tsa-key.pem"), d.join("next-key.pem")).unwrap();
    let mut text = std::fs::read_to_string(d.join("tsa.toml")).unwrap();
    text.push_str(
        "\n[rollover]\nat = \"2099-01-01T00:00:00Z\"\n[rollover.signer]\nkind = \"software\"\n\
         key = \"next-key.pem\"\ncertificate = \"next-cert.pem\"\n",
    );
    std::fs::write(d.join("tsa.toml"), text).unwrap();
    assert_eq!(
        verify_status(d, &["--strict"]).0,
        Some(0),
        "trusted, unused"
    );

    // Records 1 to 8 deleted, and an anchor at 8 signed with the other key.
    let conn = write_conn(d);
    let (hash, counter, gen_time_ns): (Vec<u8>, i64, i64) = conn
        .query_row(
            "SELECT hash, counter, gen_time_ns FROM tokens WHERE seq = 8",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let algorithm: Vec<u8> = conn
        .query_row("SELECT algorithm FROM checkpoints WHERE seq = 8", [], |r| {
            r.get(0)
        })
        .unwrap();
    let anchor = tsa::archive::record::Anchor {
        instance_id: 0,
        seq: 8,
        hash: hash.try_into().unwrap(),
        max_counter: counter as u64,
        max_gen_time_ns: gen_time_ns as u64,
        pruned_at_ns: gen_time_ns as u64 + 1,
    };
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let signature = key.sign(&rng, &anchor.message()).unwrap();
    conn.execute("DELETE FROM tokens WHERE seq <= 8", [])
        .unwrap();
    conn.execute(
        "INSERT INTO chain_anchors (instance_id, seq, hash, max_counter, max_gen_time_ns, \
         pruned_at_ns, algorithm, signature, certificate) VALUES (0, 8, ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            &anchor.hash[..],
            counter,
            gen_time_ns,
            gen_time_ns + 1,
            algorithm,
            signature.as_ref(),
            cert
        ],
    )
    .unwrap();
    drop(conn);
    let (status, out) = verify_status(d, &[]);
    assert_eq!(status, Some(0), "{out}");
    assert!(out.contains("signed by a key that signed neither"), "{out}");
    assert_eq!(verify_status(d, &["--strict"]).0, Some(2), "{out}");
}

/// Export makes every file it writes: it never truncates one that exists (the archive's own
/// database included) nor writes through a link, unless --force, which replaces the link.
#[test]
fn export_never_overwrites_nor_follows_links() {
    let dir = init("checkpoint_interval_s = 3600");
    let d = dir.path();
    let server = Serving::start(d);
    let got = stamps(&server, 2, "export");
    server.stop();
    let export = |args: &[&str]| {
        let mut all = vec!["export", "--from", "0", "--to", "4000000000"];
        all.extend_from_slice(args);
        archive_cli(d, &all)
    };

    // A link named as the first token's file, to a file of someone else's.
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    let victim = d.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let name = format!("{}.tsr", hex(&got[0].serial));
    std::os::unix::fs::symlink(&victim, out.join(&name)).unwrap();
    let (ok, text) = export(&["--dir", out.to_str().unwrap()]);
    assert!(
        !ok && text.contains(&name) && text.contains("--force"),
        "{text}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

    // The live database named as the JSON-lines file.
    let database = archive_support::database(d);
    let before = std::fs::read(&database).unwrap();
    let (ok, text) = export(&["--jsonl", database.to_str().unwrap()]);
    assert!(!ok && text.contains("the archive's own files"), "{text}");
    assert_eq!(std::fs::read(&database).unwrap(), before);
    // Not with --force either, nor by another name for it, nor its journal or the token log.
    let wal = format!("{}-wal", database.display());
    let segment = database.with_extension("tokens").join("0").join("x.tsr");
    let another_name = d.join(".").join(database.file_name().unwrap());
    for file in [
        database.to_str().unwrap(),
        &wal,
        another_name.to_str().unwrap(),
    ] {
        let (ok, text) = export(&["--jsonl", file, "--force"]);
        assert!(
            !ok && text.contains("the archive's own files"),
            "{file}: {text}"
        );
    }
    let serial = hex(&got[0].serial);
    for file in [database.to_str().unwrap(), segment.to_str().unwrap()] {
        let (ok, text) = archive_cli(d, &["get", "--serial", &serial, "--out", file, "--force"]);
        assert!(
            !ok && text.contains("the archive's own files"),
            "{file}: {text}"
        );
    }
    assert_eq!(std::fs::read(&database).unwrap(), before);
    verify_report(d).expect("the archive is untouched");
    // A link as the JSON-lines file.
    let link = d.join("tokens.jsonl");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let (ok, text) = export(&["--jsonl", link.to_str().unwrap()]);
    assert!(!ok && text.contains("tokens.jsonl"), "{text}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

    // --force replaces the links themselves.
    let (ok, text) = export(&["--dir", out.to_str().unwrap(), "--force"]);
    assert!(ok, "{text}");
    let (ok, text) = export(&["--jsonl", link.to_str().unwrap(), "--force"]);
    assert!(ok, "{text}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let file = out.join(&name);
    assert!(std::fs::symlink_metadata(&file).unwrap().is_file());
    assert_eq!(std::fs::read(&file).unwrap(), got[0].response);
    assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
    assert_eq!(std::fs::read_to_string(&link).unwrap().lines().count(), 2);
}

/// After a planned rollover the checkpoints are signed by the [rollover] key: the
/// configuration alone lets verify trust both.
#[test]
fn checkpoints_before_and_after_a_rollover_verify_with_the_configuration() {
    let dir = init("checkpoint_interval_s = 3600");
    let d = dir.path();
    // The next key and its certificate: another `tsa init`'s.
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(archive_support::TSA)
        .args(["init", "--dir"])
        .arg(other.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::copy(other.path().join("tsa-key.pem"), d.join("next-key.pem")).unwrap();
    std::fs::copy(other.path().join("tsa-cert.pem"), d.join("next-cert.pem")).unwrap();

    let server = Serving::start(d);
    stamps(&server, 3, "before the rollover");
    server.stop();
    // The instant has passed: the next start signs tokens and checkpoints with the next key.
    let config = d.join("tsa.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "\n[rollover]\nat = \"2020-01-01T00:00:00Z\"\n[rollover.signer]\nkind = \"software\"\n\
         key = \"next-key.pem\"\ncertificate = \"next-cert.pem\"\n",
    );
    std::fs::write(&config, text).unwrap();
    let server = Serving::start(d);
    stamps(&server, 3, "after the rollover");
    server.stop();

    let mut store = open_store(d);
    let checkpoints = store.checkpoints(0).unwrap();
    let next = tsa::signer::certificate::read_pem_certificates(&d.join("next-cert.pem")).unwrap();
    assert_eq!(checkpoints.len(), 2);
    assert_ne!(checkpoints[0].certificate, next[0]);
    assert_eq!(
        checkpoints[1].certificate, next[0],
        "signed by the next key"
    );
    let (status, out) = verify_status(d, &["--strict"]);
    assert_eq!(status, Some(0), "{out}");
    assert!(
        out.contains("6 records verified") && out.contains(": OK"),
        "{out}"
    );
}

/// In the token log: an altered frame is reported at its record, a lost last record as
/// missing at the end (the signed checkpoint counts it).
#[test]
fn tampering_with_the_token_log_is_reported_at_the_right_record() {
    let dir = init("checkpoint_interval_s = 3600\nlayout = \"log\"");
    let d = dir.path();
    let server = Serving::start(d);
    stamps(&server, 6, "tamper");
    server.stop();
    verify_report(d).expect("green before tampering");
    let records = archived_records(d);
    let segment = d.join("archive.tokens/0/00000000000000000001.log");
    let original = std::fs::read(&segment).unwrap();

    // One bit of record 4's imprint.
    let imprint = &records[3].record.imprint;
    let at = original
        .windows(imprint.len())
        .position(|w| w == imprint.as_slice())
        .expect("the imprint is in its frame");
    let mut altered = original.clone();
    altered[at] ^= 1;
    std::fs::write(&segment, &altered).unwrap();
    let report = verify_report(d).expect_err("tampering must be found");
    assert!(
        report.contains(&format!(
            "BROKEN at record 4 (serial {})",
            hex(&records[3].record.serial)
        )),
        "{report}"
    );
    std::fs::write(&segment, &original).unwrap();
    verify_report(d).expect("green once restored");

    // The last record's frame cut off.
    let token = &records[5].record.token;
    let last = original
        .windows(token.len())
        .position(|w| w == token.as_slice())
        .expect("the token is in its frame");
    std::fs::write(&segment, &original[..last]).unwrap();
    let report = verify_report(d).unwrap_err();
    assert!(
        report.contains("records are missing at the end"),
        "{report}"
    );
    std::fs::write(&segment, &original).unwrap();

    // Records after the last checkpoint (a server killed before its next one), one of them
    // altered: the reads stop there, and what follows is no torn commit. Verification says
    // so, as the next start would refuse to.
    let server = Serving::start(d);
    let later = stamps(&server, 4, "unsigned");
    server.kill();
    verify_report(d).expect("green before tampering, with a warning");
    let original = std::fs::read(&segment).unwrap();
    assert_eq!(later.len(), 4);
    // Frames: a 4-octet length, the body, a 32-octet hash. Record 8's length made too large.
    let mut at = 0;
    for _ in 0..7 {
        let len = u32::from_be_bytes(original[at..at + 4].try_into().unwrap()) as usize;
        at += 4 + len + 32;
    }
    let mut altered = original.clone();
    altered[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    std::fs::write(&segment, &altered).unwrap();
    // Its index gone too (derived, never synced): nothing else lists records 8 to 10.
    std::fs::remove_file(segment.with_extension("idx")).unwrap();
    let report = verify_report(d).expect_err("damage past the last checkpoint");
    assert!(report.contains("what no crash leaves"), "{report}");
    let refused = match Serving::try_start(d) {
        Ok(server) => {
            server.stop();
            panic!("the server started on it");
        }
        Err(e) => e,
    };
    assert!(refused.contains("a good frame"), "{refused}");
}

/// A frame holds the instance it was chained in: instance 0's folder copied as instance 5's
/// is no chain of instance 5.
#[test]
fn a_copy_of_an_instances_log_as_another_does_not_verify() {
    let dir = init("checkpoint_interval_s = 3600");
    let d = dir.path();
    let server = Serving::start(d);
    stamps(&server, 3, "copied");
    server.stop();
    verify_report(d).expect("green before the copy");
    let (from, to) = (d.join("archive.tokens/0"), d.join("archive.tokens/5"));
    std::fs::create_dir(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    let report = verify_report(d).expect_err("a copy of instance 0's records");
    assert!(
        report.contains("instance 5: 0 records")
            && report.contains("BROKEN at record 1")
            && report.contains("chained in instance 0"),
        "{report}"
    );
}

/// A power cut inside a commit leaves part of its frame after the last good one: the next
/// start cuts it off, keeps its octets beside the segment, and verification warns of the copy
/// (`--strict` fails) until the operator has looked at it and removed it.
#[test]
fn a_torn_tail_cut_at_start_is_kept_and_verification_says_so() {
    let dir = init("checkpoint_interval_s = 3600");
    let d = dir.path();
    let server = Serving::start(d);
    stamps(&server, 3, "torn");
    server.stop();
    let segment = d.join("archive.tokens/0/00000000000000000001.log");
    let original = std::fs::read(&segment).unwrap();
    // Frames: a 4-octet length, the body, a 32-octet hash; then the room's zeros.
    let mut end = 0;
    while end + 4 <= original.len() {
        let len = u32::from_be_bytes(original[end..end + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        end += 4 + len + 32;
    }
    let first_len = u32::from_be_bytes(original[..4].try_into().unwrap()) as usize;
    let half_a_frame = &original[..(4 + first_len + 32) / 2];
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, half_a_frame, end as u64).unwrap();
    drop(file);

    let server = Serving::start(d);
    server.stop();
    let copy = segment.with_file_name(format!("00000000000000000001.log.torn-{end}"));
    let kept = std::fs::read(&copy).expect("the torn tail kept");
    assert_eq!(
        kept,
        half_a_frame[..=half_a_frame.iter().rposition(|&b| b != 0).unwrap()]
    );
    let (status, out) = verify_status(d, &["--strict"]);
    assert_eq!(status, Some(2), "{out}");
    assert!(
        out.contains(".log.torn-") && out.contains("look at it"),
        "{out}"
    );
    std::fs::remove_file(&copy).unwrap();
    let (status, out) = verify_status(d, &["--strict"]);
    assert_eq!(status, Some(0), "{out}");
}

/// A rows archive moved into the token log: refused while the server runs; afterwards the
/// chain (pruned start included) verifies, every token is found by serial and imprint, the
/// rows are gone, and the next server goes on in the log.
#[test]
fn a_rows_archive_migrates_into_the_token_log() {
    let dir = init("checkpoint_interval_s = 3600\nlayout = \"rows\"");
    let d = dir.path();
    let server = Serving::start(d);
    let first = stamps(&server, 6, "before migration");
    let (ok, out) = archive_cli(d, &["migrate"]);
    assert!(!ok && out.contains("stop the server first"), "{out}");
    server.stop();
    // The first two pruned: the log starts after the anchor.
    let cut = chrono::DateTime::from_timestamp_nanos(first[2].gen_time_ns as i64)
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let (ok, out) = archive_cli(d, &["prune", "--before", &cut, "--force"]);
    assert!(ok && out.contains("records up to 2 removed"), "{out}");

    let (ok, out) = archive_cli(d, &["migrate"]);
    assert!(
        ok && out.contains("instance 0: 4 records moved into the token log"),
        "{out}"
    );
    assert!(d.join("archive.tokens").is_dir());
    let rows: u64 = rusqlite::Connection::open(archive_support::database(d))
        .unwrap()
        .query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0, "the rows are gone");
    let out = verify_report(d).unwrap();
    assert!(out.contains("4 records verified, up to 6"), "{out}");
    let (ok, out) = archive_cli(d, &["migrate"]);
    assert!(!ok && out.contains("token log already"), "{out}");

    // The configuration still says rows: the archive keeps its own layout.
    let server = Serving::start(d);
    let second = stamps(&server, 2, "after migration");
    server.stop();
    let out = verify_report(d).unwrap();
    assert!(out.contains("6 records verified, up to 8"), "{out}");
    let mut store = open_store(d);
    for got in first[2..].iter().chain(&second) {
        let by_serial = store.record_by_serial(&got.serial).unwrap().unwrap();
        assert_eq!(by_serial.record.token, got.token);
        let by_imprint = store.records_by_imprint(&got.imprint, 10).unwrap();
        assert_eq!(by_imprint.total, 1);
        assert_eq!(by_imprint.records.len(), 1);
        assert_eq!(by_imprint.records[0].record.serial, got.serial);
    }
    assert!(
        store.record_by_serial(&first[0].serial).unwrap().is_none(),
        "pruned"
    );
}

fn restore(dir: &Path, snapshot: &Path) {
    let db = archive_support::database(dir);
    for suffix in ["-wal", "-shm"] {
        let mut name = db.as_os_str().to_os_string();
        name.push(suffix);
        let _ = std::fs::remove_file(name);
    }
    std::fs::copy(snapshot, &db).unwrap();
    verify_report(dir).expect("the snapshot verifies");
}

/// Pruning removes old records but what remains verifies, restarts continue the chain from
/// the anchor, and counters and genTimes stay above what was pruned.
#[test]
fn pruning_keeps_verification_green() {
    // Rows: pruned record by record (the log prunes whole segments: src/archive/log/tests.rs).
    let dir = init("checkpoint_interval_s = 3600\nlayout = \"rows\"");
    let d = dir.path();
    let server = Serving::start(d);
    let first = stamps(&server, 5, "prune");
    server.stop();
    let rfc3339 = |ns: u64| {
        chrono::DateTime::from_timestamp_nanos(ns as i64)
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
    };
    // Before the third token: refused where the configuration keeps every record
    // (retention_days 0), and within a retention of a day; nothing goes.
    let cut = rfc3339(first[2].gen_time_ns);
    let (ok, out) = archive_cli(d, &["prune", "--before", &cut]);
    assert!(!ok && out.contains("retention_days is 0"), "{out}");
    let config = std::fs::read_to_string(d.join("tsa.toml")).unwrap();
    let with_retention = config.replacen("[archive]\n", "[archive]\nretention_days = 1\n", 1);
    assert_ne!(config, with_retention);
    std::fs::write(d.join("tsa.toml"), &with_retention).unwrap();
    let (ok, out) = archive_cli(d, &["prune", "--before", &cut]);
    assert!(
        !ok && out.contains("within archive.retention_days (1 days)"),
        "{out}"
    );
    assert!(open_store(d)
        .record_by_serial(&first[0].serial)
        .unwrap()
        .is_some());
    // Without its signer (the key unreadable here), nothing goes either: the anchor a prune
    // leaves is signed in its transaction.
    let without_key = config.replacen("key = \"tsa-key.pem\"", "key = \"missing.pem\"", 1);
    assert_ne!(config, without_key);
    std::fs::write(d.join("tsa.toml"), &without_key).unwrap();
    let (ok, out) = archive_cli(d, &["prune", "--before", &cut, "--force"]);
    assert!(!ok && out.contains("nothing pruned"), "{out}");
    assert!(open_store(d)
        .record_by_serial(&first[0].serial)
        .unwrap()
        .is_some());
    std::fs::write(d.join("tsa.toml"), &config).unwrap();
    // With --force the first two go.
    let (ok, out) = archive_cli(d, &["prune", "--before", &cut, "--force"]);
    assert!(ok && out.contains("records up to 2 removed"), "{out}");
    let out = verify_report(d).unwrap();
    assert!(
        out.contains("3 records verified, up to 5")
            && out.contains("pruned up to 2")
            && !out.contains("WARNING"),
        "{out}"
    );
    // The anchor is signed: moved or changed by hand, it shows; unsigned, a warning.
    let conn = write_conn(d);
    conn.execute("UPDATE chain_anchors SET max_counter = max_counter + 1", [])
        .unwrap();
    let out = verify_report(d).unwrap_err();
    assert!(
        out.contains("the anchor (pruned up to 2) has a bad signature"),
        "{out}"
    );
    conn.execute("UPDATE chain_anchors SET max_counter = max_counter - 1", [])
        .unwrap();
    let signature: Vec<u8> = conn
        .query_row("SELECT signature FROM chain_anchors", [], |r| r.get(0))
        .unwrap();
    // Above the last checkpoint's anchor (none: the server was stopped when it pruned), an
    // anchor without its signature is one moved on by hand.
    conn.execute("UPDATE chain_anchors SET signature = NULL", [])
        .unwrap();
    let out = verify_report(d).unwrap_err();
    assert!(
        out.contains(
            "the anchor (pruned up to 2) is above the last checkpoint's (0) and not signed"
        ),
        "{out}"
    );
    conn.execute("UPDATE chain_anchors SET signature = ?1", [&signature])
        .unwrap();
    drop(conn);
    assert!(!verify_report(d).unwrap().contains("WARNING"));
    let mut store = open_store(d);
    assert!(store.record_by_serial(&first[1].serial).unwrap().is_none());
    assert!(store.record_by_serial(&first[2].serial).unwrap().is_some());

    // The chain goes on from the head after a restart.
    let server = Serving::start(d);
    let second = stamps(&server, 2, "after prune");
    server.stop();
    let out = verify_report(d).unwrap();
    assert!(out.contains("5 records verified, up to 7"), "{out}");
    // Its checkpoints signed the anchor's position: they vouch for it, signed or not.
    let conn = write_conn(d);
    conn.execute("UPDATE chain_anchors SET signature = NULL", [])
        .unwrap();
    let out = verify_report(d).unwrap();
    assert!(!out.contains("WARNING"), "{out}");
    conn.execute("UPDATE chain_anchors SET signature = ?1", [&signature])
        .unwrap();
    drop(conn);

    // Everything pruned: the anchor is the head; the next start still counts on from it.
    let (ok, out) = archive_cli(d, &["prune", "--before", "4000000000", "--force"]);
    assert!(ok && out.contains("records up to 7 removed"), "{out}");
    let out = verify_report(d).unwrap();
    assert!(out.contains("0 records verified, up to 7"), "{out}");
    // Without the state file too: the anchor alone keeps counters and genTime above.
    std::fs::remove_file(d.join("archive.state")).unwrap();
    let server = Serving::start(d);
    let third = stamps(&server, 1, "after everything pruned");
    server.stop();
    let counter = |r: &Received| layout::decode(&r.serial).unwrap().1;
    assert!(counter(&third[0]) > counter(&second[1]));
    assert!(third[0].gen_time_ns > second[1].gen_time_ns);
    let out = verify_report(d).unwrap();
    assert!(out.contains("1 records verified, up to 8"), "{out}");
}

/// While the database cannot be written (another process holds its write lock), requests get
/// systemFailure and no token; readiness says why; afterwards the writer's probe (once a
/// second, not at every request) finds it writable, readiness comes back and tokens are
/// archived again.
#[test]
fn an_unwritable_archive_withholds_tokens() {
    // Rows: a lock on the database stops their commits (the log's writes fail with its disk:
    // tests/disk_full.rs).
    let dir = init("busy_timeout_ms = 1000\nlayout = \"rows\"");
    let d = dir.path();
    let server = Serving::start(d);
    let mut conn = Conn::connect(&server.public).unwrap();
    let before = stamp(&mut conn, b"before").unwrap().expect("granted");

    let locker = write_conn(d);
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    // Commits the writer tried (failed ones too), from the commit-time histogram's count.
    let commits = || {
        let (status, body) = get(&server.admin, "/metrics");
        assert_eq!(status, 200);
        String::from_utf8(body)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("tsa_archive_commit_duration_seconds_count "))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("tsa_archive_commit_duration_seconds_count")
    };
    let mut tried = commits();
    for i in 0..3 {
        let rejected = stamp(&mut conn, format!("while locked {i}").as_bytes())
            .unwrap()
            .expect_err("no token while the archive cannot be written");
        assert_eq!(rejected.fail_info(), Some(FailInfo::SystemFailure));
        let text = rejected.status_text.join(" ");
        assert!(text.contains("archived"), "{text}");
        // The first is committed, waits out the lock (busy_timeout_ms) and fails; the next
        // ones are refused without a commit (the writer tries the store again a second after
        // the failure, by itself, with a probe, not at each request), however long they take.
        let now = commits();
        if i == 0 {
            assert!(now > tried, "the first request was not committed");
        } else {
            assert_eq!(
                now, tried,
                "request {i} was committed to an archive known to fail"
            );
        }
        tried = now;
    }
    let (status, body) = get(&server.admin, "/health/ready");
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("archive"));
    locker.execute_batch("ROLLBACK").unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&server.admin, "/health/ready").0 != 200 {
        assert!(Instant::now() < deadline, "not ready again");
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = stamp(&mut conn, b"after").unwrap().expect("granted again");
    let mut store = open_store(d);
    let count = archived_records(d).len();
    assert_eq!(count, 2, "only the granted tokens are archived");
    for got in [&before, &after] {
        assert_eq!(
            store
                .record_by_serial(&got.serial)
                .unwrap()
                .unwrap()
                .record
                .token,
            got.token
        );
    }
    server.stop();
    verify_report(d).unwrap();
}

/// Serials that cannot be reserved leave every request refused once the block in hand runs
/// out: readiness says so, and the writer's probe reserves the block by itself once it can,
/// with no request needed (a balancer sends none to an unready instance).
#[test]
fn serials_that_cannot_be_reserved_fail_readiness_until_a_probe_reserves_them() {
    let dir = init("serial_block = 4");
    let d = dir.path();
    let server = Serving::start(d);
    // The state file is replaced through `.archive.state.<pid>.tmp` (`tsa::files::replace`):
    // a directory there makes every reservation fail, root or not.
    let blocker = d.join(format!(".archive.state.{}.tmp", server.pid()));
    std::fs::create_dir(&blocker).unwrap();
    let mut conn = Conn::connect(&server.public).unwrap();
    let mut granted = 0;
    let rejected = loop {
        match stamp(&mut conn, format!("request {granted}").as_bytes()).unwrap() {
            Ok(_) => granted += 1,
            Err(rejected) => break rejected,
        }
        assert!(granted <= 8, "the serial block never ran out");
    };
    assert_eq!(rejected.fail_info(), Some(FailInfo::SystemFailure));
    let (status, body) = get(&server.admin, "/health/ready");
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("archive"));

    std::fs::remove_dir(&blocker).unwrap();
    let start = std::time::Instant::now();
    while get(&server.admin, "/health/ready").0 != 200 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "still unready 10 s after the state file could be written again"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    stamp(&mut conn, b"after").unwrap().expect("granted again");
    server.stop();
    verify_report(d).unwrap();
}

/// The state directory's lock keeps a second server out; a database that cannot be opened
/// stops the start with a clear message.
#[test]
fn one_server_per_state_directory() {
    let dir = init("");
    let d = dir.path();
    let server = Serving::start(d);
    let err = Serving::try_start(d)
        .err()
        .expect("the second server must not start");
    assert!(
        err.contains("another tsa serves from this state directory"),
        "{err}"
    );
    server.kill();
    // After a crash the lock is free again.
    let server = Serving::start(d);
    server.stop();

    let other = init("database = \"missing/dir/archive.sqlite\"");
    let err = Serving::try_start(other.path())
        .err()
        .expect("must not start");
    assert!(err.contains("cannot open the archive"), "{err}");
}

/// A database restored from an older backup, or a lost state file, never brings a counter or
/// a genTime back: the start takes the highest of both. A genTime floor ahead of the clock
/// refuses requests (timeNotAvailable) until the clock passes it.
#[test]
fn restored_backups_and_lost_state_files_never_reuse_serials() {
    let dir = init("");
    let d = dir.path();
    let counter = |r: &Received| layout::decode(&r.serial).unwrap().1;

    let server = Serving::start(d);
    stamps(&server, 3, "before the backup");
    server.stop();
    let backup = d.join("backup.sqlite");
    write_conn(d)
        .execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
        .unwrap();
    let server = Serving::start(d);
    let lost = stamps(&server, 3, "lost with the restore");
    server.stop();

    // The old backup comes back; the state file still knows better.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!(
            "{}{suffix}",
            archive_support::database(d).display()
        ));
    }
    std::fs::copy(&backup, archive_support::database(d)).unwrap();
    let server = Serving::start(d);
    let restored = stamps(&server, 1, "after the restore");
    server.stop();
    assert!(counter(&restored[0]) > counter(&lost[2]));
    assert!(restored[0].gen_time_ns > lost[2].gen_time_ns);
    verify_report(d).expect("the restored chain goes on");

    // The state file is lost: the database alone.
    std::fs::remove_file(d.join("archive.state")).unwrap();
    let server = Serving::start(d);
    let again = stamps(&server, 1, "without the state file");
    server.stop();
    assert!(counter(&again[0]) > counter(&restored[0]));

    // A genTime floor 10 s ahead (as if the clock had been set back since the last run): far
    // enough that the start, the connection and the first request surely come before it.
    let floor = again[0].gen_time_ns.max(tsa::clock::system_unix_ns()) + 10_000_000_000;
    let state = std::fs::read_to_string(d.join("archive.state")).unwrap();
    let state: String = state
        .lines()
        .map(|l| match l.strip_prefix("gen_time_ns ") {
            Some(_) => format!("gen_time_ns {floor}\n"),
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(d.join("archive.state"), state).unwrap();
    let server = Serving::start(d);
    let mut conn = Conn::connect(&server.public).unwrap();
    let refused = stamp(&mut conn, b"before the floor").unwrap().unwrap_err();
    assert_eq!(refused.fail_info(), Some(FailInfo::TimeNotAvailable));
    while tsa::clock::system_unix_ns() < floor + 5_000_000 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A new connection: the first may have idled out (read_timeout_ms) meanwhile.
    let mut conn = Conn::connect(&server.public).unwrap();
    let granted = stamp(&mut conn, b"after the floor")
        .unwrap()
        .expect("granted");
    assert!(granted.gen_time_ns > floor);
    server.stop();
}

/// One document stamped more times than the CLI prints: the admin look-up answers the
/// latest token and counts them all; `tsa archive get --imprint` prints the latest `--limit`
/// and says how many more there are, and writes the latest with `--out`.
#[test]
fn an_imprint_stamped_many_times_gives_its_latest_token_and_a_count() {
    an_imprint_stamped_many_times("rows");
}

#[test]
fn an_imprint_stamped_many_times_gives_its_latest_token_and_a_count_with_the_token_log() {
    an_imprint_stamped_many_times("log");
}

fn an_imprint_stamped_many_times(layout: &str) {
    let dir = init(&format!("layout = \"{layout}\""));
    let d = dir.path();
    let server = Serving::start(d);
    let mut conn = Conn::connect(&server.public).unwrap();
    let ours: Vec<Received> = (0..12)
        .map(|_| {
            stamp(&mut conn, b"the same document")
                .unwrap()
                .expect("granted")
        })
        .collect();
    let latest = ours.last().unwrap();
    let imprint = hex(&latest.imprint);
    let (status, matches, body) = get_with_header(
        &server.admin,
        &format!("/archive/imprint/{imprint}"),
        "x-archive-matches",
    );
    assert_eq!((status, &body), (200, &latest.response));
    assert_eq!(matches.as_deref(), Some("12"));
    server.stop();

    let tsr = d.join("latest.tsr");
    let (ok, out) = archive_cli(
        d,
        &[
            "get",
            "--imprint",
            &imprint,
            "--limit",
            "5",
            "--out",
            tsr.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    let printed: Vec<&str> = out.lines().filter(|l| l.starts_with("serial")).collect();
    let newest: Vec<String> = ours
        .iter()
        .rev()
        .take(5)
        .map(|r| format!("serial      : {}", hex(&r.serial)))
        .collect();
    assert_eq!(printed, newest, "{out}");
    assert!(
        out.contains("7 of the 12 tokens with this imprint not shown"),
        "{out}"
    );
    assert_eq!(std::fs::read(&tsr).unwrap(), latest.response);

    // All of them: nothing more to say.
    let (ok, out) = archive_cli(d, &["get", "--imprint", &imprint]);
    assert!(ok, "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("serial")).count(), 12);
    assert!(!out.contains("not shown"), "{out}");
    // Counted only; --out still writes the latest, replacing a file with --force only.
    let again = |force: &[&str]| {
        let mut args = vec![
            "get",
            "--imprint",
            &imprint,
            "--limit",
            "0",
            "--out",
            tsr.to_str().unwrap(),
        ];
        args.extend_from_slice(force);
        archive_cli(d, &args)
    };
    std::fs::write(&tsr, b"kept").unwrap();
    let (ok, out) = again(&[]);
    assert!(!ok && out.contains("exists already"), "{out}");
    assert_eq!(std::fs::read(&tsr).unwrap(), b"kept");
    let (ok, out) = again(&["--force"]);
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(&tsr).unwrap(), latest.response);
    assert!(!out.contains("serial"), "{out}");
    assert!(
        out.contains("12 of the 12 tokens with this imprint not shown"),
        "{out}"
    );
}

#[test]
fn a_look_up_by_imprint_takes_the_digest_algorithm_in_rows() {
    one_imprint_under_two_digests("rows");
}

#[test]
fn a_look_up_by_imprint_takes_the_digest_algorithm_in_the_token_log() {
    one_imprint_under_two_digests("log");
}

/// The same octets stamped as a SHA-256 and as a SHA3-256 imprint are two imprints: a look-up
/// that names the algorithm gets only its tokens (a client verifying the re-fetched token
/// hashes its document with the token's algorithm); one that does not gets them all.
fn one_imprint_under_two_digests(layout: &str) {
    let dir = init(&format!("layout = \"{layout}\""));
    let d = dir.path();
    let server = Serving::start(d);
    let mut conn = Conn::connect(&server.public).unwrap();
    let sha256 = Query::for_data(DigestAlgorithm::Sha256, b"an invoice").unwrap();
    let sha3 = Query {
        digest: DigestAlgorithm::Sha3_256,
        ..sha256.clone()
    };
    let mut granted = |query: &Query| stamp_query(&mut conn, query).unwrap().expect("granted");
    let (first, second, other) = (granted(&sha256), granted(&sha256), granted(&sha3));
    assert_eq!(first.imprint, other.imprint);
    let imprint = hex(&first.imprint);
    let look_up = |query: &str| {
        get_with_header(
            &server.admin,
            &format!("/archive/imprint/{imprint}{query}"),
            "x-archive-matches",
        )
    };
    let (status, matches, body) = look_up("");
    assert_eq!((status, matches.as_deref()), (200, Some("3")));
    assert_eq!(body, other.response);
    for query in ["?alg=sha256", "?alg=SHA256", "?alg=2.16.840.1.101.3.4.2.1"] {
        let (status, matches, body) = look_up(query);
        assert_eq!((status, matches.as_deref()), (200, Some("2")), "{query}");
        assert_eq!(body, second.response, "{query}");
    }
    let (status, matches, body) = look_up("?alg=sha3-256");
    assert_eq!((status, matches.as_deref()), (200, Some("1")));
    assert_eq!(body, other.response);
    assert_eq!(look_up("?alg=sha512").0, 404);
    for bad in [
        "?alg=whirlpool",
        "?alg=1.2.3",
        "?digest=sha256",
        "?alg=sha256&alg=sha3-256",
    ] {
        let (status, _, body) = look_up(bad);
        assert_eq!(status, 400, "{bad}: {}", String::from_utf8_lossy(&body));
    }
    let by_serial = format!("/archive/serial/{}?alg=sha256", hex(&first.serial));
    assert_eq!(get(&server.admin, &by_serial).0, 400);
    server.stop();

    let serials = |alg: &[&str]| {
        let mut args = vec!["get", "--imprint", &imprint];
        args.extend_from_slice(alg);
        let (ok, out) = archive_cli(d, &args);
        assert!(ok, "{out}");
        out.lines()
            .filter_map(|l| l.strip_prefix("serial      : "))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let hexes = |rs: &[&Received]| rs.iter().map(|r| hex(&r.serial)).collect::<Vec<_>>();
    assert_eq!(serials(&[]), hexes(&[&other, &second, &first]));
    assert_eq!(serials(&["--alg", "sha256"]), hexes(&[&second, &first]));
    assert_eq!(serials(&["--alg", "sha3-256"]), hexes(&[&other]));
    let (ok, out) = archive_cli(d, &["get", "--imprint", &imprint, "--alg", "sha4"]);
    assert!(!ok && out.contains("unknown digest"), "{out}");
}

/// The imprint index is derived data: when it cannot be kept (here a directory stands where
/// its database would be), the server still starts and archives, and look-ups by imprint
/// read the archive itself.
#[test]
fn without_its_imprint_index_the_archive_still_serves_and_finds_tokens() {
    // Rows: the imprint database is theirs (the log keeps imprint files per segment).
    let dir = init("layout = \"rows\"");
    let d = dir.path();
    let index = tsa::archive::imprints::path_for(&archive_support::database(d));
    std::fs::create_dir(&index).unwrap();
    std::fs::write(index.join("keep"), b"not a database").unwrap();
    let server = Serving::start(d);
    let ours = stamps(&server, 3, "no index");
    for got in &ours {
        let (status, body) = get(
            &server.admin,
            &format!("/archive/imprint/{}", hex(&got.imprint)),
        );
        assert_eq!((status, &body), (200, &got.response));
    }
    let (status, metrics) = get(&server.admin, "/metrics");
    assert_eq!(status, 200);
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("tsa_archive_queue_depth"), "{metrics}");
    assert!(
        !metrics.contains("tsa_archive_imprint_index_behind"),
        "no index, no lag: {metrics}"
    );
    server.stop();
    assert!(
        index.join("keep").exists(),
        "what stood there is left alone"
    );
    let (ok, out) = archive_cli(d, &["verify"]);
    assert!(ok && out.contains("cannot be read"), "{out}");
}

/// Archive look-ups run on the blocking pool, a few at once: a client that asks for many slow
/// look-ups (an imprint stamped thousands of times) at the same time gets 503 with
/// `Retry-After` for those past the places, never a pool filled for the signatures; the
/// places come back when the look-ups end.
#[test]
fn look_ups_past_their_places_get_503_with_retry_after() {
    const STAMPS: usize = 6_000;
    const ASKING: usize = 12;
    let dir = init("layout = \"log\"");
    let server = Serving::start(dir.path());
    let mut conn = Conn::connect(&server.public).unwrap();
    let mut last = None;
    for _ in 0..STAMPS {
        last = Some(
            stamp(&mut conn, b"a frequent document")
                .unwrap()
                .expect("granted"),
        );
    }
    let path = format!("/archive/imprint/{}", hex(&last.unwrap().imprint));
    let started = std::time::Instant::now();
    let (status, matches, _) = get_with_header(&server.admin, &path, "x-archive-matches");
    let one = started.elapsed();
    assert_eq!((status, matches), (200, Some(STAMPS.to_string())));

    let barrier = std::sync::Barrier::new(ASKING);
    let answers: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
        let asking: Vec<_> = (0..ASKING)
            .map(|_| {
                s.spawn(|| {
                    let mut conn = Conn::connect(&server.admin).unwrap();
                    barrier.wait();
                    let reply = conn.exchange("GET", &path, b"").unwrap();
                    (reply.status, reply.header("retry-after").map(str::to_owned))
                })
            })
            .collect();
        asking.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let busy = answers.iter().filter(|(status, _)| *status == 503).count();
    let served = answers.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!(busy + served, ASKING, "{answers:?}");
    // The look-ups take the archive's reader in turn, each about as long as the one alone
    // (some 40 ms in a debug build): the fifth asking within the first one's time finds the
    // four places taken.
    assert!(
        busy > 0,
        "{ASKING} look-ups of {one:?} each, none refused: {answers:?}"
    );
    assert!(served >= 1, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|(status, retry)| *status == 200 || retry.as_deref() == Some("1")),
        "{answers:?}"
    );
    // Every place is back.
    let (status, matches, _) = get_with_header(&server.admin, &path, "x-archive-matches");
    assert_eq!((status, matches), (200, Some(STAMPS.to_string())));
    server.stop();
}
