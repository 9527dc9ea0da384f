//! The archive on PostgreSQL (`[archive] backend = "postgres"`), against a real private
//! cluster (tests/common/postgres.rs): every token recorded and `tsa archive verify` green;
//! the instance-id lease keeps out a second process with the same id; a kill -9 loop under
//! load never archives a serial twice nor loses a token a client received; an outage of
//! PostgreSQL withholds tokens until the server has reconnected by itself; and a process
//! that lost its lease stops issuing. The fleet behind a load balancer: tests/fleet.rs.

mod archive_support;
#[path = "common/postgres.rs"]
mod pg;
#[path = "common/ports.rs"]
mod ports;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use archive_support::{
    archive_cli, chained, chained_with, check_received, checkpoint_of, get, hex, init,
    one_checkpoint_per_position, stamp, Conn, Load, Received, Serving,
};
use tsa::archive::postgres::{Lease, PostgresStore};
use tsa::archive::record::StoredRecord;
use tsa::archive::store::ArchiveStore;
use tsa::config::Config;
use tsa::protocol::FailInfo;

/// A state directory whose archive is `database` on the cluster, as instance `id`.
fn setup(cluster: &pg::Cluster, database: &str, id: u32, extra: &str) -> tempfile::TempDir {
    init(&format!(
        "backend = \"postgres\"\npostgres_url = \"{}\"\ninstance_id = {id}\nlease_ttl_s = 2\n{extra}",
        cluster.url(database)
    ))
}

/// Instance 0's archive in a new database `tsa` of `cluster`, opened.
fn new_archive(cluster: &pg::Cluster) -> (tempfile::TempDir, PostgresStore) {
    cluster.create_database("tsa");
    let dir = setup(cluster, "tsa", 0, "");
    let config = Config::load(&dir.path().join("tsa.toml")).unwrap();
    let store = PostgresStore::open(&config.archive).unwrap();
    (dir, store)
}

fn store(dir: &Path) -> PostgresStore {
    let config = Config::load(&dir.join("tsa.toml")).unwrap();
    PostgresStore::open_existing(&config.archive).unwrap()
}

#[test]
fn records_are_complete_and_verify_on_postgres() {
    let cluster = pg::Cluster::start();
    cluster.create_database("tsa");
    // More tokens than a page of the store's visits (500) and small blocks.
    let dir = setup(
        &cluster,
        "tsa",
        0,
        "serial_block = 50\ncheckpoint_interval_s = 1",
    );
    let d = dir.path();
    let server = Serving::start(d);
    let mut conn = Conn::connect(&server.public).unwrap();
    let received: Vec<Received> = (0..600)
        .map(|i| {
            stamp(&mut conn, format!("postgres {i}").as_bytes())
                .unwrap()
                .unwrap()
        })
        .collect();
    // Admin look-ups while the server runs (the reader store, called from the runtime).
    let (status, body) = get(
        &server.admin,
        &format!("/archive/serial/{}", hex(&received[7].serial)),
    );
    assert_eq!(status, 200);
    assert_eq!(body, received[7].response);
    let (status, _) = get(
        &server.admin,
        &format!("/archive/imprint/{}", hex(&received[9].imprint)),
    );
    assert_eq!(status, 200);
    server.stop();

    let mut store = store(d);
    let records = pg::all_records(&mut store, 0);
    assert_eq!(records.len(), received.len());
    let by_serial: HashMap<&[u8], &StoredRecord> = records
        .iter()
        .map(|r| (r.record.serial.as_slice(), r))
        .collect();
    for got in &received {
        let r = by_serial
            .get(got.serial.as_slice())
            .expect("a received token is not archived");
        assert_eq!(r.record.token, got.token);
        assert_eq!(r.response(), got.response);
    }
    let found = store
        .record_by_serial(&received[3].serial)
        .unwrap()
        .unwrap();
    assert_eq!(found.record.token, received[3].token);
    assert!(!store.checkpoints(0).unwrap().is_empty());
    assert!(store
        .events(0, u64::MAX)
        .unwrap()
        .iter()
        .any(|e| e.kind == "archive_opened"));
    let mut in_time = 0;
    store
        .for_each_in_time(0, u64::MAX, &mut |_| {
            in_time += 1;
            Ok(true)
        })
        .unwrap();
    assert_eq!(in_time, received.len());

    let (ok, report) = archive_cli(d, &["verify"]);
    assert!(ok, "{report}");
    assert!(report.contains(": OK"), "{report}");
    let (ok, out) = archive_cli(
        d,
        &["get", "--serial", &hex(&received[0].serial), "--token"],
    );
    assert!(ok, "{out}");

    // Pruning everything leaves an anchor; what remains (nothing) still verifies, and a
    // restart continues above every pruned counter.
    let (ok, out) = archive_cli(d, &["prune", "--before", "4000000000", "--force"]);
    assert!(ok, "{out}");
    assert!(pg::all_records(&mut store, 0).is_empty());
    let (ok, report) = archive_cli(d, &["verify"]);
    assert!(ok, "{report}");
    let server = Serving::start(d);
    let mut conn = Conn::connect(&server.public).unwrap();
    let after = stamp(&mut conn, b"after pruning").unwrap().unwrap();
    server.stop();
    let max_before = received
        .iter()
        .map(|r| tsa::archive::serial::layout::decode(&r.serial).unwrap().1)
        .max()
        .unwrap();
    assert!(
        tsa::archive::serial::layout::decode(&after.serial)
            .unwrap()
            .1
            > max_before
    );
    let (ok, report) = archive_cli(d, &["verify"]);
    assert!(ok, "{report}");
}

/// A lease given back while its holder lives on (a process about to end with a signer stuck,
/// whose archive is never dropped: `Archive::close_within`) lets the next holder in at once,
/// not after its time to live.
#[test]
fn a_lease_given_back_is_free_at_once() {
    let cluster = pg::Cluster::start();
    cluster.create_database("lease");
    let dir = setup(&cluster, "lease", 3, "");
    let mut config = Config::load(&dir.path().join("tsa.toml")).unwrap();
    config.archive.lease_ttl_s = 60;
    let held = Lease::acquire(&config.archive).expect("the lease");
    let refused = Lease::acquire(&config.archive)
        .err()
        .expect("a second holder while the first holds it");
    assert!(
        refused
            .to_string()
            .contains("held by another live instance"),
        "{refused}"
    );
    held.release(Duration::from_secs(5));
    let again = Lease::acquire(&config.archive).expect("free once given back");
    assert!(!again.lost());
    drop(held);
    assert!(!again.lost(), "the first holder's drop took nothing");
}

#[test]
fn a_second_instance_with_the_same_id_is_refused_while_the_first_holds_the_lease() {
    let cluster = pg::Cluster::start();
    cluster.create_database("fleet");
    let first_dir = setup(&cluster, "fleet", 7, "");
    let twin_dir = setup(&cluster, "fleet", 7, "");
    let other_dir = setup(&cluster, "fleet", 8, "");
    let first = Serving::start(first_dir.path());
    // Longer than the lease's lifetime: only the renewals keep it.
    std::thread::sleep(Duration::from_secs(3));
    let err = Serving::try_start(twin_dir.path())
        .err()
        .expect("a second instance 7 started while the first runs");
    assert!(err.contains("held by another live instance"), "{err}");
    // Another id on the same database starts (a fleet).
    let other = Serving::start(other_dir.path());
    let mut a = Conn::connect(&first.public).unwrap();
    let mut b = Conn::connect(&other.public).unwrap();
    let ta = stamp(&mut a, b"first").unwrap().unwrap();
    let tb = stamp(&mut b, b"other").unwrap().unwrap();
    assert_ne!(ta.serial, tb.serial);
    // A clean stop gives the lease back at once.
    first.stop();
    let twin = Serving::start(twin_dir.path());
    let mut c = Conn::connect(&twin.public).unwrap();
    let tc = stamp(&mut c, b"twin").unwrap().unwrap();
    twin.stop();
    other.stop();
    let mut store = store(first_dir.path());
    assert_eq!(pg::all_records(&mut store, 7).len(), 2);
    assert_eq!(pg::all_records(&mut store, 8).len(), 1);
    let serials: HashSet<Vec<u8>> = [ta.serial, tb.serial, tc.serial].into_iter().collect();
    assert_eq!(serials.len(), 3);
    // Each directory made its own TSU certificate: trust the others' too.
    let certs = [twin_dir.path(), other_dir.path()]
        .map(|d| d.join("tsa-cert.pem").to_str().unwrap().to_string());
    let (ok, report) = archive_cli(
        first_dir.path(),
        &["verify", "--cert", &certs[0], "--cert", &certs[1]],
    );
    assert!(ok, "{report}");
    // Each instance's records and its events.
    let ok = |what: &str| {
        report
            .lines()
            .filter(|l| l.trim_start().starts_with(what) && l.ends_with(": OK"))
            .count()
    };
    assert_eq!((ok("instance "), ok("events:")), (2, 2), "{report}");

    // A prune from one instance's configuration cuts that instance only (signed with its
    // key, by its retention); the others' records stay.
    let (ok, out) = archive_cli(
        other_dir.path(),
        &["prune", "--before", "4000000000", "--force"],
    );
    assert!(
        ok && out.contains("instance 8: records up to 1 removed"),
        "{out}"
    );
    assert!(!out.contains("instance 7"), "{out}");
    assert!(pg::all_records(&mut store, 8).is_empty());
    assert_eq!(pg::all_records(&mut store, 7).len(), 2);
}

const ROUNDS: usize = 8;
const CLIENTS: usize = 4;

#[test]
fn kill_9_under_load_on_postgres_never_reuses_a_serial_nor_loses_a_token() {
    let started = Instant::now();
    let cluster = pg::Cluster::start();
    cluster.create_database("crash");
    let dir = setup(
        &cluster,
        "crash",
        0,
        "serial_block = 40\ncheckpoint_interval_s = 1",
    );
    let d = dir.path();
    // Per run: the tokens the clients received.
    let mut received: Vec<Vec<Received>> = Vec::new();
    let mut refused = 0;
    for round in 0..ROUNDS {
        // After a kill the lease stays until it expires (lease_ttl_s = 2): the start is
        // refused until then.
        let deadline = Instant::now() + Duration::from_secs(15);
        let server = loop {
            match Serving::try_start(d) {
                Ok(s) => break s,
                Err(e) if e.contains("held by another live instance") => {
                    refused += 1;
                    assert!(Instant::now() < deadline, "the lease never expired: {e}");
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(e) => panic!("tsa serve did not start: {e}"),
            }
        };
        let load = Load::start(&server.public, CLIENTS, &format!("round {round}"));
        std::thread::sleep(Duration::from_millis(150 + 40 * round as u64));
        server.kill();
        received.push(load.stop());
    }
    assert!(
        refused > 0,
        "no start was refused for the dead instance's lease"
    );
    // A last, clean run: its shutdown signs a checkpoint over everything.
    let deadline = Instant::now() + Duration::from_secs(15);
    let server = loop {
        match Serving::try_start(d) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                assert!(e.contains("held by another live instance"), "{e}");
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => panic!("tsa serve did not start: {e}"),
        }
    };
    let mut conn = Conn::connect(&server.public).unwrap();
    received.push(vec![stamp(&mut conn, b"after the crashes")
        .unwrap()
        .unwrap()]);
    server.stop();
    let total: usize = received.iter().map(Vec::len).sum();
    assert!(total > ROUNDS, "too few tokens: {total}");

    let mut store = store(d);
    let records = pg::all_records(&mut store, 0);
    // No serial twice, every received token archived, each run's counters above the last.
    check_received(&records, &received);
    let opened = store
        .events(0, u64::MAX)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "archive_opened")
        .count();
    assert_eq!(opened, ROUNDS + 1);
    let (ok, report) = archive_cli(d, &["verify"]);
    assert!(ok, "{report}");
    assert!(report.contains(": OK"), "{report}");
    eprintln!(
        "{ROUNDS} kills: {} tokens archived, {total} received, {refused} refused starts, in {:.1} s",
        records.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The readiness answer: (status, body).
fn ready(admin: &str) -> (u16, String) {
    let (status, body) = get(admin, "/health/ready");
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn refused(conn: &mut Conn, data: &str) -> String {
    let rejected = stamp(conn, data.as_bytes())
        .unwrap()
        .expect_err("a token was granted");
    assert_eq!(rejected.fail_info(), Some(FailInfo::SystemFailure));
    rejected.status_text.join(" ")
}

#[test]
fn a_postgres_outage_withholds_tokens_and_the_server_reconnects_by_itself() {
    let started = Instant::now();
    let cluster = pg::Cluster::start();
    cluster.create_database("outage");
    let dir = setup(&cluster, "outage", 3, "checkpoint_interval_s = 1");
    let d = dir.path();
    let server = Serving::start(d);
    let mut conn = Conn::connect(&server.public).unwrap();
    let mut received = vec![stamp(&mut conn, b"before").unwrap().expect("granted")];
    assert_eq!(ready(&server.admin).0, 200);

    // PostgreSQL goes away (every session ended): no token leaves, each request gets a DER
    // rejection with systemFailure, readiness fails and says why.
    cluster.stop();
    let down = Instant::now();
    for i in 0..5 {
        let text = refused(&mut conn, &format!("during the outage {i}"));
        assert!(text.contains("archived"), "{text}");
    }
    let (status, body) = ready(&server.admin);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("archive"), "{body}");
    // A key event during the outage (a reload): kept, and stored once the archive is back.
    let reload_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.pid(), libc::SIGHUP) };
    // Longer than the lease's lifetime (lease_ttl_s = 2): nobody took it, so it is renewed
    // afterwards; readiness stays down meanwhile, without any request.
    while down.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(ready(&server.admin).0, 503);
    }
    assert!(refused(&mut conn, "still down").contains("archived"));

    // PostgreSQL is back: the server reconnects without a request (readiness comes back, so
    // that a load balancer sends it requests again) and issues.
    cluster.start_again();
    let back = Instant::now();
    let deadline = back + Duration::from_secs(10);
    while ready(&server.admin).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready again: {}",
            ready(&server.admin).1
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let recovered_in = back.elapsed();
    for i in 0..20 {
        received.push(
            stamp(&mut conn, format!("after the outage {i}").as_bytes())
                .unwrap()
                .expect("granted again"),
        );
    }
    // The admin look-ups reconnect too.
    let (status, body) = get(
        &server.admin,
        &format!("/archive/serial/{}", hex(&received[0].serial)),
    );
    assert_eq!(status, 200);
    assert_eq!(body, received[0].response);
    server.stop();

    // Exactly the tokens granted are archived, byte for byte; the outage is an event.
    let mut store = store(d);
    let records = pg::all_records(&mut store, 3);
    assert_eq!(records.len(), received.len());
    for (r, got) in records.iter().zip(&received) {
        assert_eq!(r.record.serial, got.serial);
        assert_eq!(r.record.token, got.token);
    }
    let events = store.events(0, u64::MAX).unwrap();
    let recovered: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "archive_recovered")
        .collect();
    assert_eq!(recovered.len(), 1, "{events:?}");
    assert!(
        recovered[0].fields.contains("\"refused_records\":6"),
        "{}",
        recovered[0].fields
    );
    // The reload of the outage is there, before the recovery, with its own time.
    let reloaded = events
        .iter()
        .find(|e| e.kind == "certificate_reloaded" && e.time_ns >= reload_ns)
        .unwrap_or_else(|| panic!("the reload during the outage was lost: {events:?}"));
    assert!(reloaded.seq < recovered[0].seq && reloaded.time_ns < recovered[0].time_ns);
    assert!(recovered[0].fields.contains("\"dropped_events\":0"));
    let (ok, report) = archive_cli(d, &["verify"]);
    assert!(ok, "{report}");
    eprintln!(
        "outage: ready again {:.2} s after PostgreSQL came back; {:.1} s in all",
        recovered_in.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_process_that_lost_its_lease_stops_issuing() {
    let cluster = pg::Cluster::start();
    cluster.create_database("lease");
    let dir = setup(&cluster, "lease", 4, "");
    let d = dir.path();
    let server = Serving::start(d);
    let mut conn = Conn::connect(&server.public).unwrap();
    let first = stamp(&mut conn, b"first").unwrap().expect("granted");

    // Another process holds the id now (as after a takeover of an expired lease).
    let mut psql = cluster.client("lease");
    let n = psql
        .execute(
            "UPDATE instance_leases SET holder = 'intruder:1:0', \
             expires_at = clock_timestamp() + interval '1 hour' WHERE instance_id = 4",
            &[],
        )
        .unwrap();
    assert_eq!(n, 1);
    // The very next commit checks the lease in its transaction: no token.
    // The client is told the token was not archived; why (the lease) is for the log and
    // readiness.
    let text = refused(&mut conn, "after the takeover");
    assert!(
        text.contains("archived") && !text.contains("lease"),
        "{text}"
    );
    let (status, body) = ready(&server.admin);
    assert_eq!(status, 503);
    assert!(body.contains("lease"), "{body}");
    // Lost for good: with the row gone, the process still issues nothing (another one may
    // have used the id meanwhile; only a start takes a lease).
    psql.execute("DELETE FROM instance_leases WHERE instance_id = 4", &[])
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(refused(&mut conn, "row deleted").contains("archived"));
    let (status, body) = ready(&server.admin);
    assert_eq!(status, 503);
    assert!(body.contains("lease"), "{body}");
    server.kill();

    // A new process takes the id and issues.
    let server = Serving::start(d);
    let mut conn = Conn::connect(&server.public).unwrap();
    let second = stamp(&mut conn, b"second").unwrap().expect("granted");
    server.stop();
    let mut store = store(d);
    let records = pg::all_records(&mut store, 4);
    let serials: Vec<&[u8]> = records.iter().map(|r| r.record.serial.as_slice()).collect();
    assert_eq!(serials, [first.serial.as_slice(), second.serial.as_slice()]);
    let (ok, report) = archive_cli(d, &["verify"]);
    assert!(ok, "{report}");
}

// TLS to PostgreSQL (src/archive/postgres/tls.rs), against a cluster with `ssl = on` whose
// TCP connections are TLS only (tests/common/postgres.rs, `Cluster::start_tls`).

/// A state directory whose archive is `database` on `cluster` as `user`, with `settings`
/// (key=value) appended to the connection string and `extra` lines under `[archive]`.
fn setup_tls(
    cluster: &pg::Cluster,
    database: &str,
    user: &str,
    settings: &str,
    id: u32,
    extra: &str,
) -> tempfile::TempDir {
    init(&format!(
        "backend = \"postgres\"\npostgres_url = \"host=127.0.0.1 port={} user={user} \
         dbname={database} connect_timeout=10 {settings}\"\ninstance_id = {id}\n\
         lease_ttl_s = 2\n{extra}",
        cluster.port
    ))
}

/// `postgres_ca = [file]`, as a TOML line.
fn ca_line(file: &Path) -> String {
    format!("postgres_ca = [{:?}]\n", file.display().to_string())
}

/// The TLS state of the TSA's sessions (application_name "tsa") on the cluster: (TCP from
/// 127.0.0.1, TLS, protocol version, client certificate's DN) per session.
fn tsa_sessions(cluster: &pg::Cluster) -> Vec<(bool, bool, Option<String>, Option<String>)> {
    cluster
        .client("postgres")
        .query(
            "SELECT a.client_addr = '127.0.0.1'::inet, s.ssl, s.version, s.client_dn \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'tsa'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

#[test]
fn tokens_reach_postgres_over_verified_tls_with_channel_binding() {
    let started = Instant::now();
    let (cluster, pki) = pg::Cluster::start_tls();
    let mut admin = cluster.client("postgres");
    let u = pg::SCRAM_USER;
    admin
        .batch_execute(&format!("CREATE ROLE {u} LOGIN PASSWORD 'correct horse'"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE tls OWNER {u}"))
        .unwrap();
    // The cluster takes no TCP connection without TLS.
    let plain = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=tls sslmode=disable",
            cluster.port
        ),
        postgres::NoTls,
    )
    .err()
    .expect("a plain connection was accepted");
    let plain = plain
        .as_db_error()
        .expect("refused by the server")
        .message();
    assert!(plain.contains("no encryption"), "{plain}");

    // SCRAM with the TLS channel bound (channel_binding=require fails without it).
    let password = cluster.path().join("password");
    std::fs::write(&password, "correct horse\n").unwrap();
    std::fs::set_permissions(
        &password,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap();
    let dir = setup_tls(
        &cluster,
        "tls",
        pg::SCRAM_USER,
        "sslmode=require channel_binding=require",
        0,
        &format!(
            "{}postgres_password_file = {:?}\ncheckpoint_interval_s = 1",
            ca_line(&pki.ca),
            password.display().to_string()
        ),
    );
    let d = dir.path();
    let server = Serving::start(d);
    let mut conn = Conn::connect(&server.public).unwrap();
    let received: Vec<Received> = (0..50)
        .map(|i| {
            stamp(&mut conn, format!("over TLS {i}").as_bytes())
                .unwrap()
                .unwrap()
        })
        .collect();
    // The reader's connection too (an admin look-up).
    let (status, body) = get(
        &server.admin,
        &format!("/archive/serial/{}", hex(&received[5].serial)),
    );
    assert_eq!(status, 200);
    assert_eq!(body, received[5].response);
    // Every session of the TSA (lease keeper, writer, reader) is TCP and TLS.
    let sessions = tsa_sessions(&cluster);
    assert!(sessions.len() >= 3, "{sessions:?}");
    for (tcp, tls, version, _) in &sessions {
        assert!(*tcp && *tls, "{sessions:?}");
        assert!(version.as_deref().is_some_and(|v| v.starts_with("TLSv1.")));
    }
    server.stop();

    // The CLI connects the same way: everything is there and verifies.
    let mut store = store(d);
    let records = pg::all_records(&mut store, 0);
    assert_eq!(records.len(), received.len());
    for (r, got) in records.iter().zip(&received) {
        assert_eq!(r.record.serial, got.serial);
        assert_eq!(r.record.token, got.token);
    }
    let (ok, report) = archive_cli(d, &["verify"]);
    assert!(ok, "{report}");
    assert!(report.contains(": OK"), "{report}");
    eprintln!("TLS archive: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn an_unverifiable_postgres_server_is_refused_at_start() {
    let (cluster, pki) = pg::Cluster::start_tls();
    cluster.create_database("tls");
    // A CA that did not sign the server's certificate.
    let dir = setup_tls(
        &cluster,
        "tls",
        "postgres",
        "sslmode=require",
        1,
        &ca_line(&pki.other_ca),
    );
    let err = Serving::try_start(dir.path())
        .err()
        .expect("started with a server certificate from another CA");
    assert!(
        err.contains("certificate failed verification")
            && err.contains("UnknownIssuer")
            && err.contains("other-ca.pem"),
        "{err}"
    );
    // The right CA, but the certificate does not name the host asked for (the TCP
    // connection still goes to 127.0.0.1): verify-full.
    let dir = init(&format!(
        "backend = \"postgres\"\npostgres_url = \"host=db.example.org hostaddr=127.0.0.1 \
         port={} user=postgres dbname=tls connect_timeout=10\"\n{}",
        cluster.port,
        ca_line(&pki.ca)
    ));
    let err = Serving::try_start(dir.path())
        .err()
        .expect("started with a certificate for another name");
    assert!(
        err.contains("certificate failed verification")
            && err.contains("not valid for name \"db.example.org\""),
        "{err}"
    );
    // postgres_tls_insecure: encrypted, the server not authenticated; it issues.
    let dir = setup_tls(
        &cluster,
        "tls",
        "postgres",
        "sslmode=require",
        2,
        "postgres_tls_insecure = true",
    );
    let server = Serving::start(dir.path());
    let mut conn = Conn::connect(&server.public).unwrap();
    let token = stamp(&mut conn, b"insecure").unwrap().unwrap();
    let sessions = tsa_sessions(&cluster);
    assert!(
        !sessions.is_empty() && sessions.iter().all(|s| s.0 && s.1),
        "{sessions:?}"
    );
    server.stop();
    let mut store = store(dir.path());
    let records = pg::all_records(&mut store, 2);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].record.serial, token.serial);
    // libpq's default, sslmode=prefer, without a CA: TLS when the server offers it (here it
    // must: hostssl only), plain over the Unix socket, where PostgreSQL offers none.
    for host in [
        "127.0.0.1".to_string(),
        cluster.path().display().to_string(),
    ] {
        let config = tsa::config::ArchiveConfig {
            postgres_url: format!(
                "host={host} port={} user=postgres dbname=tls connect_timeout=10",
                cluster.port
            ),
            ..Default::default()
        };
        let mut store =
            PostgresStore::open_existing(&config).unwrap_or_else(|e| panic!("{host}: {e}"));
        assert_eq!(pg::all_records(&mut store, 2).len(), 1);
    }
}

#[test]
fn sslmode_require_without_a_ca_is_refused_before_connecting() {
    // Nothing listens there: the refusal comes from the settings, not from a connection.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = init(&format!(
        "backend = \"postgres\"\npostgres_url = \"host=127.0.0.1 port={port} user=tsa \
         sslmode=require\"\n"
    ));
    let err = Serving::try_start(dir.path())
        .err()
        .expect("started with sslmode=require and no CA");
    assert!(
        err.contains("sslmode=require but archive.postgres_ca is not set")
            && err.contains("postgres_tls_insecure"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let (ok, out) = archive_cli(dir.path(), &["verify"]);
    assert!(!ok && out.contains("postgres_ca"), "{out}");
}

#[test]
fn a_client_certificate_logs_in_without_a_password() {
    let (cluster, pki) = pg::Cluster::start_tls();
    let mut admin = cluster.client("postgres");
    let u = pg::CERT_USER;
    admin
        .batch_execute(&format!("CREATE ROLE {u} LOGIN"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE certs OWNER {u}"))
        .unwrap();
    let files = format!(
        "{}postgres_client_certificate = {:?}\npostgres_client_key = {:?}\n",
        ca_line(&pki.ca),
        pki.client_certificate.display().to_string(),
        pki.client_key.display().to_string()
    );
    let dir = setup_tls(&cluster, "certs", pg::CERT_USER, "", 5, &files);
    let server = Serving::start(dir.path());
    let mut conn = Conn::connect(&server.public).unwrap();
    let received: Vec<Received> = (0..10)
        .map(|i| {
            stamp(&mut conn, format!("cert {i}").as_bytes())
                .unwrap()
                .unwrap()
        })
        .collect();
    let sessions = tsa_sessions(&cluster);
    assert!(!sessions.is_empty());
    for (tcp, tls, _, dn) in &sessions {
        assert!(*tcp && *tls, "{sessions:?}");
        assert_eq!(
            dn.as_deref(),
            Some(format!("/CN={}", pg::CERT_USER).as_str())
        );
    }
    server.stop();
    let mut store = store(dir.path());
    assert_eq!(pg::all_records(&mut store, 5).len(), received.len());
    let (ok, report) = archive_cli(dir.path(), &["verify"]);
    assert!(ok, "{report}");

    // Without the certificate, the same role is refused.
    let dir = setup_tls(&cluster, "certs", pg::CERT_USER, "", 6, &ca_line(&pki.ca));
    let err = Serving::try_start(dir.path())
        .err()
        .expect("logged in without the client certificate");
    assert!(err.contains("requires a valid client certificate"), "{err}");
}

#[test]
fn checkpoints_signed_again_with_later_events_replace_theirs_on_postgres() {
    let cluster = pg::Cluster::start();
    let (_dir, mut store) = new_archive(&cluster);
    let records = chained(0, 3);
    store.append(0, &records, &[]).unwrap();
    one_checkpoint_per_position(&mut store, &records);
}

#[test]
fn pruning_on_postgres_never_goes_past_the_last_signed_checkpoint() {
    let cluster = pg::Cluster::start();
    let (_dir, mut store) = new_archive(&cluster);
    let records = chained(0, 10);
    store.append(0, &records[..5], &[]).unwrap();
    assert_eq!(store.prune(0, u64::MAX).unwrap(), None, "no checkpoint yet");
    store.add_checkpoint(&checkpoint_of(&records[4])).unwrap();
    store.append(0, &records[5..], &[]).unwrap();
    let anchor = store.prune(0, u64::MAX).unwrap().expect("pruned");
    assert_eq!(anchor.seq, 5);
    assert_eq!(anchor.hash, records[4].hash);
    let kept: Vec<u64> = pg::all_records(&mut store, 0)
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(kept, (6..=10).collect::<Vec<_>>());
    assert_eq!(store.prune(0, u64::MAX).unwrap(), None, "nothing more");
}

#[test]
fn pruning_on_postgres_signs_its_anchor_before_it_locks_the_instance() {
    let cluster = pg::Cluster::start();
    let (_dir, mut store) = new_archive(&cluster);
    let records = chained(0, 10);
    store.append(0, &records, &[]).unwrap();
    store.add_checkpoint(&checkpoint_of(&records[9])).unwrap();
    // While the anchor is signed (an HSM may take seconds), the instance's row is free: the
    // server's commits and lease renewals do not wait for the signer.
    let free = std::sync::Mutex::new(Vec::new());
    let sign = |anchor: &tsa::archive::record::Anchor| {
        let mut other = cluster.client("tsa");
        let row = other.query(
            "SELECT 1 FROM instances WHERE instance_id = 0 FOR UPDATE NOWAIT",
            &[],
        );
        free.lock()
            .unwrap()
            .push((anchor.seq, row.map(|r| r.len())));
        Ok(None)
    };
    let anchor = store.prune_signed(0, u64::MAX, &sign).unwrap().unwrap();
    let free = free.into_inner().unwrap();
    assert_eq!(free.len(), 1, "signed once");
    assert_eq!(free[0].0, anchor.seq);
    assert_eq!(free[0].1.as_ref().ok(), Some(&1), "{:?}", free[0].1);
    assert_eq!(store.instance(0).unwrap().anchor, Some(anchor));
}

/// One imprint stamped 53 times by two instances, among look-alikes, with genTimes out of
/// position order and equal across instances: a look-up answers the newest `limit` (the later
/// genTime first, then the lower instance, then the later position) and counts every match;
/// pruned records no longer count.
#[test]
fn a_frequent_imprint_gives_its_newest_records_and_counts_them_all_on_postgres() {
    let cluster = pg::Cluster::start();
    let (_dir, mut store) = new_archive(&cluster);
    let frequent = vec![0x42; 32];
    let mut twin = frequent.clone();
    twin[31] = 0;
    const BASE: u64 = 1_700_000_000_000_000_000;
    // Instance 0: every third record the look-alike; every tenth from the second on has the
    // genTime of 13 positions further on (74 for 61: a tie with 74).
    let gen_time_ns = |seq: u64| match seq % 10 {
        1 => BASE + 1_000 * (seq + 13),
        _ => BASE + 1_000 * seq,
    };
    let zero = chained_with(0, 75, |seq, r| {
        r.imprint = (if seq % 3 == 0 { &twin } else { &frequent }).clone();
        r.gen_time_ns = gen_time_ns(seq);
    });
    // Instance 1: the genTimes of instance 0's newest two, and an old one; the second's
    // octets are a SHA3-256 imprint.
    const SHA3_256: &str = "2.16.840.1.101.3.4.2.8";
    let one = chained_with(1, 3, |seq, r| {
        r.imprint = frequent.clone();
        r.gen_time_ns = [gen_time_ns(71), gen_time_ns(74), BASE][seq as usize - 1];
        if seq == 2 {
            r.imprint_alg = SHA3_256.into();
        }
    });
    store.append(0, &zero, &[]).unwrap();
    store.append(1, &one, &[]).unwrap();
    let expected = |above: u64| -> Vec<(u32, u64)> {
        let mut found: Vec<&StoredRecord> = zero
            .iter()
            .filter(|r| r.seq > above)
            .chain(&one)
            .filter(|r| r.record.imprint == frequent)
            .collect();
        found.sort_by_key(|r| {
            std::cmp::Reverse((
                r.record.gen_time_ns,
                std::cmp::Reverse(r.instance_id),
                r.seq,
            ))
        });
        found.iter().map(|r| (r.instance_id, r.seq)).collect()
    };
    assert_eq!(
        expected(0)[..5],
        [(0, 71), (1, 1), (0, 74), (0, 61), (1, 2)]
    );
    let look_up = |store: &mut PostgresStore, limit: usize| {
        let found = store.records_by_imprint(&frequent, limit).unwrap();
        assert!(found.records.iter().all(|r| r.record.imprint == frequent));
        let at: Vec<(u32, u64)> = found
            .records
            .iter()
            .map(|r| (r.instance_id, r.seq))
            .collect();
        (at, found.total)
    };
    assert_eq!(look_up(&mut store, 3), (expected(0)[..3].to_vec(), 53));
    assert_eq!(look_up(&mut store, 0), (vec![], 53));
    assert_eq!(look_up(&mut store, 100), (expected(0), 53));
    let found = store.records_by_imprint(&frequent, 1).unwrap();
    assert_eq!(found.records, [zero[70].clone()], "the whole record");
    assert_eq!(store.records_by_imprint(&twin, 3).unwrap().total, 25);
    // By algorithm: the SHA3-256 one alone, or all but it.
    let of = |store: &mut PostgresStore, alg: &str| {
        let found = store
            .records_by_imprint_of(Some(alg), &frequent, 2)
            .unwrap();
        let at: Vec<(u32, u64)> = found
            .records
            .iter()
            .map(|r| (r.instance_id, r.seq))
            .collect();
        (at, found.total)
    };
    assert_eq!(of(&mut store, SHA3_256), (vec![(1, 2)], 1));
    let sha256: Vec<_> = expected(0).into_iter().filter(|&at| at != (1, 2)).collect();
    assert_eq!(
        of(&mut store, "2.16.840.1.101.3.4.2.1"),
        (sha256[..2].to_vec(), 52)
    );

    // Instance 0 pruned up to position 10 (the first genTime at or after the cut is 11's).
    store.add_checkpoint(&checkpoint_of(&zero[74])).unwrap();
    let anchor = store.prune(0, gen_time_ns(11)).unwrap().expect("pruned");
    assert_eq!(anchor.seq, 10);
    let left = expected(10);
    assert_eq!(left.len(), 46);
    assert_eq!(look_up(&mut store, 3), (left[..3].to_vec(), 46));
    assert_eq!(look_up(&mut store, 100), (left, 46));
}

#[test]
fn an_instance_id_outside_u32_is_refused_not_truncated() {
    let cluster = pg::Cluster::start();
    let (_dir, mut store) = new_archive(&cluster);
    // 2^32: as u32 it would read as instance 0.
    cluster
        .client("tsa")
        .execute(
            "INSERT INTO chain_anchors (instance_id, seq, hash, max_counter, max_gen_time_ns, \
             pruned_at_ns) VALUES (4294967296, 1, '\\x00', 0, 0, 0)",
            &[],
        )
        .unwrap();
    let error = store.instances().unwrap_err().to_string();
    assert!(error.contains("4294967296"), "{error}");
}

/// A column of another type than the schema's (a database altered by hand) is an error the
/// store reports, not a panic in the server's writer or in `tsa archive verify`.
#[test]
fn a_column_of_another_type_is_an_error_not_a_panic() {
    let cluster = pg::Cluster::start();
    let (dir, mut store) = new_archive(&cluster);
    store.instance(0).unwrap();
    cluster
        .client("tsa")
        .batch_execute(
            "INSERT INTO instances (instance_id, reserved_until, max_counter, max_gen_time_ns, \
             updated_ns) VALUES (0, 1, 1, 1, 1) ON CONFLICT DO NOTHING; \
             ALTER TABLE instances ALTER COLUMN max_counter TYPE TEXT",
        )
        .unwrap();
    let error = store.instance(0).unwrap_err().to_string();
    assert!(error.contains("error deserializing column 1"), "{error}");
    let (status, out) = archive_support::archive_cli_status(dir.path(), &["verify"]);
    assert_eq!(status, Some(1), "an error, not a panic (101): {out}");
}

/// The plan of a look-up's query with sequential and bitmap scans off: what index it reads,
/// and whether it sorts.
fn look_up_plan(client: &mut postgres::Client) -> String {
    let mut tx = client.transaction().unwrap();
    tx.batch_execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off")
        .unwrap();
    let rows = tx
        .query(
            "EXPLAIN SELECT instance_id, seq FROM tokens WHERE imprint = decode('42', 'hex') \
             ORDER BY gen_time_ns DESC, instance_id, seq DESC LIMIT 3",
            &[],
        )
        .unwrap();
    rows.iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

fn has_index(client: &mut postgres::Client, name: &str) -> bool {
    client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .unwrap()
        .get(0)
}

/// The imprint index is in the order look-ups answer in, so that the newest of an imprint
/// are read from its start, with no sort of all its tokens. An archive of an earlier build,
/// with tokens and only the index by imprint, keeps that one (building the new one at start
/// would hold every instance's inserts) until the operator builds the new one beside the
/// running servers (`tsa archive migrate`, which the log names; again, it finds nothing to do;
/// after a build that failed, it builds again); look-ups answer the same with either.
#[test]
fn the_imprint_index_reads_look_ups_in_their_order_and_waits_for_the_operator() {
    let cluster = pg::Cluster::start();
    cluster.create_database("tsa");
    let dir = setup(&cluster, "tsa", 0, "");
    let config = Config::load(&dir.path().join("tsa.toml")).unwrap();
    let mut client = cluster.client("tsa");
    let frequent = vec![0x42; 32];
    let records = chained_with(0, 20, |seq, r| {
        r.imprint = frequent.clone();
        r.gen_time_ns = 1_700_000_000_000_000_000 + (seq % 7) * 1_000;
    });
    let newest = |store: &mut PostgresStore| {
        let found = store.records_by_imprint(&frequent, 3).unwrap();
        let at: Vec<u64> = found.records.iter().map(|r| r.seq).collect();
        (at, found.total)
    };

    let mut store = PostgresStore::open(&config.archive).unwrap();
    assert!(has_index(&mut client, "tokens_imprint_newest"));
    assert!(
        !has_index(&mut client, "tokens_imprint"),
        "one index is enough"
    );
    let plan = look_up_plan(&mut client);
    assert!(
        plan.contains("tokens_imprint_newest") && !plan.contains("Sort"),
        "{plan}"
    );
    store.append(0, &records, &[]).unwrap();
    // The latest genTime (6 × 1,000 ns) at positions 6, 13 and 20: the later position first.
    assert_eq!(newest(&mut store), (vec![20, 13, 6], 20));
    drop(store);

    // An earlier build's archive: the tokens, and the index by imprint alone.
    client
        .batch_execute(
            "DROP INDEX tokens_imprint_newest; CREATE INDEX tokens_imprint ON tokens (imprint)",
        )
        .unwrap();
    let mut store = PostgresStore::open(&config.archive).unwrap();
    assert!(!has_index(&mut client, "tokens_imprint_newest"));
    assert!(has_index(&mut client, "tokens_imprint"));
    assert!(look_up_plan(&mut client).contains("Sort"));
    assert_eq!(newest(&mut store), (vec![20, 13, 6], 20));

    // The operator's command, which the log names, while a server has the archive open.
    let (ok, out) = archive_cli(dir.path(), &["migrate"]);
    assert!(ok && out.contains("is built"), "{out}");
    assert!(has_index(&mut client, "tokens_imprint_newest"));
    assert!(!has_index(&mut client, "tokens_imprint"));
    assert_eq!(newest(&mut store), (vec![20, 13, 6], 20));
    drop(store);
    let mut store = PostgresStore::open(&config.archive).unwrap();
    assert!(!has_index(&mut client, "tokens_imprint"));
    assert!(!look_up_plan(&mut client).contains("Sort"));
    assert_eq!(newest(&mut store), (vec![20, 13, 6], 20));

    // Again: nothing to do.
    let (ok, out) = archive_cli(dir.path(), &["migrate"]);
    assert!(ok && out.contains("was there already"), "{out}");
    // An index a failed concurrent build left (invalid: the planner does not use it): a
    // server starts and answers look-ups meanwhile, and migrate builds it again...
    client
        .batch_execute(
            "UPDATE pg_index SET indisvalid = false \
             WHERE indexrelid = 'tokens_imprint_newest'::regclass",
        )
        .unwrap();
    drop(store);
    let mut store = PostgresStore::open(&config.archive).unwrap();
    assert_eq!(newest(&mut store), (vec![20, 13, 6], 20));
    // ...but not while another migrate holds the build.
    client
        .batch_execute("SELECT pg_advisory_lock(3162)")
        .unwrap();
    let (ok, out) = archive_cli(dir.path(), &["migrate"]);
    assert!(
        !ok && out.contains("another `tsa archive migrate`"),
        "{out}"
    );
    client
        .batch_execute("SELECT pg_advisory_unlock(3162)")
        .unwrap();
    let (ok, out) = archive_cli(dir.path(), &["migrate"]);
    assert!(ok && out.contains("is built"), "{out}");
    let valid: bool = client
        .query_one(
            "SELECT indisvalid FROM pg_index \
             WHERE indexrelid = 'tokens_imprint_newest'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(valid);
    assert_eq!(newest(&mut store), (vec![20, 13, 6], 20));
}

/// An archive of schema 1 (events without hashes, checkpoints without the events' head) is
/// read as it is, and migrated by the first server that opens it: its events are chained
/// after the old ones, and the whole verifies.
#[test]
fn an_archive_of_schema_1_is_read_as_it_is_and_migrated_by_a_server() {
    let cluster = pg::Cluster::start();
    let (dir, mut written) = new_archive(&cluster);
    let old = |seq: u64| tsa::archive::record::EventRecord {
        instance_id: 0,
        seq,
        time_ns: seq,
        level: "info".into(),
        kind: "sync_acquired".into(),
        message: format!("event {seq}"),
        fields: "{}".into(),
        prev_hash: None,
        body_hash: None,
        hash: None,
    };
    written.append(0, &[], &[old(1), old(2)]).unwrap();
    drop(written);
    let mut client = cluster.client("tsa");
    client
        .batch_execute(&tsa::archive::store::back_to_1_for_tests())
        .unwrap();
    let mut read = store(dir.path());
    assert_eq!(read.events_from(0, 0, 10).unwrap(), [old(1), old(2)]);
    drop(read);

    let server = Serving::start(dir.path());
    let mut conn = Conn::connect(&server.public).unwrap();
    stamp(&mut conn, b"after the migration").unwrap().unwrap();
    server.stop();
    let schema: String = client
        .query_one("SELECT value FROM archive_meta WHERE name = 'schema'", &[])
        .unwrap()
        .get(0);
    assert_eq!(schema, tsa::archive::store::SCHEMA_VERSION);
    let events = store(dir.path()).events_from(0, 3, 1).unwrap();
    assert_eq!(
        events[0].prev_hash,
        Some([0; 32]),
        "the chain starts after the old ones"
    );
    let (ok, report) = archive_cli(dir.path(), &["verify"]);
    assert!(ok, "{report}");
    assert!(
        report.contains("2 of them stored before events were chained")
            && report
                .lines()
                .any(|l| l.trim_start().starts_with("events:") && l.ends_with(": OK")),
        "{report}"
    );
}
