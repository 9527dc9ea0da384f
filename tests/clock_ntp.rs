//! The disciplined clock end to end: the real server, in-process NTP servers on loopback with
//! scripted behaviour, real HTTP and the real `openssl ts` client.

#[path = "common/clock.rs"]
mod clock;
mod common;
#[path = "common/ntp.rs"]
mod ntp;
#[path = "common/wire.rs"]
mod wire;

use std::time::{Duration, Instant};

use clock::{clock_report, count, query, ready, stamp, wait_for};
use ntp::{Behaviour, NtpServer};
use tsa::protocol::FailInfo;

/// `n` NTP servers on loopback, each `offset_ns` off the system clock.
fn ntp_servers(n: usize, offset_ns: i64) -> Vec<NtpServer> {
    (0..n)
        .map(|_| {
            NtpServer::start(Behaviour {
                offset_ns,
                ..Default::default()
            })
        })
        .collect()
}

/// A TSA disciplined by `servers` (`extra`: more `[clock]` settings), once it is synchronized
/// and ready.
fn synchronized_tsa(servers: &[NtpServer], extra: &str) -> common::Server {
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let server = clock::tsa_disciplined(&addrs, extra);
    wait_for(
        || ready(&server),
        "synchronization",
        Duration::from_secs(10),
    );
    server
}

/// A datagram from another port of a server's address before each of its replies (a stray,
/// or a spoofer who knows the address and not the port) does not end the poll: the client's
/// socket takes datagrams from its server alone, and the clock synchronizes. (It read the
/// first datagram and failed each poll on its address.)
#[test]
fn a_datagram_from_another_port_does_not_spoil_a_poll() {
    let servers: Vec<NtpServer> = (0..3)
        .map(|_| {
            NtpServer::start(Behaviour {
                stray_first: true,
                ..Default::default()
            })
        })
        .collect();
    let server = synchronized_tsa(&servers, "");
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    let (response, _, _) = stamp(&server, work.path());
    assert!(response.granted(), "{:?}", response.status_text);
}

/// The references say the time is 5 s later than this machine's clock: the TSA follows them,
/// and genTime ± accuracy holds the references' time of the exchange.
#[test]
fn follows_the_references_not_the_system_clock() {
    let offset = 5_000_000_000i64;
    let servers = ntp_servers(5, offset);
    let server = synchronized_tsa(&servers, "");
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    for _ in 0..5 {
        let (response, sent, received) = stamp(&server, work.path());
        assert!(response.granted(), "{:?}", response.status_text);
        let token = response.token.unwrap();
        let tst = token.tst_info();
        let gen = tst.gen_time.unix_ns() as i64;
        let accuracy = tst.accuracy.unwrap().as_ns() as i64;
        assert!(accuracy < 50_000_000, "accuracy {accuracy} ns on loopback");
        let (lo, hi) = (sent as i64 + offset, received as i64 + offset);
        assert!(
            gen + accuracy >= lo && gen - accuracy <= hi,
            "genTime {gen} ± {accuracy} outside [{lo}, {hi}]"
        );
        assert_eq!(tst.policy.to_string(), "0.4.0.2023.1.1");
    }
    // Under load a reply can be late, so give the table a moment to show all five again.
    wait_for(
        || {
            let report = clock_report(&server);
            report.contains("State       : synchronized") && count(&report, "selected") == 5
        },
        "five selected sources",
        Duration::from_secs(5),
    );
}

#[test]
fn falsetickers_are_rejected_and_tokens_keep_the_true_time() {
    let mut servers = ntp_servers(3, 0);
    servers.extend(ntp_servers(1, 3_000_000_000));
    servers.extend(ntp_servers(1, -3_000_000_000));
    let server = synchronized_tsa(&servers, "");
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    let (response, sent, received) = stamp(&server, work.path());
    let tst = response.token.as_ref().unwrap().tst_info();
    let (gen, accuracy) = (tst.gen_time.unix_ns(), tst.accuracy.unwrap().as_ns());
    assert!(gen + accuracy >= sent && gen - accuracy <= received);
    wait_for(
        || count(&clock_report(&server), "falseticker") == 2,
        "two falsetickers",
        Duration::from_secs(5),
    );
}

/// Three of five servers step by +2 s together: no token carries the stepped time until the
/// step persisted for the confirmation rounds; requests meanwhile get timeNotAvailable.
#[test]
fn a_majority_step_stops_issuance_until_confirmed() {
    let servers = ntp_servers(5, 0);
    // Slow the confirmation down so that the refusal is easy to observe: 10 rounds of 200 ms.
    let server = synchronized_tsa(&servers, "step_confirm_rounds = 10\n");
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    assert!(stamp(&server, work.path()).0.granted());

    for s in &servers[..3] {
        s.set(|b| b.offset_ns = 2_000_000_000);
    }
    let step_at = Instant::now();
    let mut refused = 0;
    let mut stepped = false;
    while step_at.elapsed() < Duration::from_secs(8) && !stepped {
        let (response, sent, _) = stamp(&server, work.path());
        match &response.token {
            Some(token) => {
                let tst = token.tst_info();
                let ahead = tst.gen_time.unix_ns() as i64 - sent as i64;
                if ahead > 1_000_000_000 {
                    // The stepped time: only after the confirmation rounds (10 × 200 ms).
                    assert!(
                        step_at.elapsed() >= Duration::from_millis(1_600),
                        "followed after {:?}",
                        step_at.elapsed()
                    );
                    assert!(refused > 0, "a step was followed without any refusal");
                    stepped = true;
                } else {
                    assert!(ahead.abs() < 500_000_000, "genTime off by {ahead} ns");
                }
            }
            None => {
                assert_eq!(response.fail_info(), Some(FailInfo::TimeNotAvailable));
                refused += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(refused > 0, "the step never stopped issuance");
    assert!(stepped, "the persisting step was never followed");
}

/// Three servers, the clock synchronized to them at an exaggerated drift rate (so that its
/// bound passes the declared accuracy within seconds after they are lost); then every server
/// turns `lost`: holdover, then refusal, and readiness fails. Returns the TSA and the servers.
fn every_source_lost(lost: fn(&mut Behaviour)) -> (common::Server, Vec<NtpServer>) {
    let servers = ntp_servers(3, 0);
    let server = synchronized_tsa(
        &servers,
        "max_drift_ppm = 200000.0\nmax_sample_age_ms = 400\n",
    );
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    assert!(stamp(&server, work.path()).0.granted());
    for s in &servers {
        s.set(lost);
    }
    // The status is rendered at each update: without updates it would stay "synchronized".
    wait_for(
        || clock_report(&server).contains("State       : holdover"),
        "holdover",
        Duration::from_secs(5),
    );
    wait_for(
        || stamp(&server, work.path()).0.fail_info() == Some(FailInfo::TimeNotAvailable),
        "refusal once the bound passes 1 s",
        Duration::from_secs(15),
    );
    assert!(!ready(&server));
    (server, servers)
}

/// Every server goes silent: holdover, with the bound growing, then refusal.
#[test]
fn losing_every_source_ends_in_refusal_when_the_bound_passes_the_accuracy() {
    every_source_lost(|b| b.silent = true);
}

/// Every server turns to refusing us (kiss-o'-death DENY): each source is left alone, and the
/// clock goes on without them, through holdover to refusal, its status and events kept up.
#[test]
fn every_server_refusing_us_ends_in_holdover_then_refusal_observed() {
    let (server, servers) = every_source_lost(|b| b.kod = Some(*b"DENY"));
    let unreachable = |report: &str| {
        report
            .lines()
            .filter(|l| l.starts_with("ntp ") && l.split_whitespace().nth(2) == Some("0"))
            .count()
    };
    wait_for(
        || unreachable(&clock_report(&server)) == servers.len(),
        "every source unreachable in the status",
        Duration::from_secs(5),
    );
    assert!(!ready(&server));
}

/// One server of three goes silent: too few left to select from, so holdover, and tokens go
/// on (within the references' time); it comes back and the clock is synchronized again. Then
/// the other two go silent (holdover on the one left, which agrees), and that one jumps 5 s
/// ahead: it contradicts the clock's model, and every request is refused.
#[test]
fn one_source_of_three_lost_is_holdover_and_a_contradicting_one_stops_it() {
    let servers = ntp_servers(3, 0);
    let server = synchronized_tsa(&servers, "max_sample_age_ms = 400\n");
    let work = tempfile::tempdir().unwrap();
    query(work.path());

    servers[0].set(|b| b.silent = true);
    wait_for(
        || clock_report(&server).contains("State       : holdover"),
        "holdover",
        Duration::from_secs(10),
    );
    for _ in 0..5 {
        let (response, sent, received) = stamp(&server, work.path());
        assert!(response.granted(), "{:?}", response.status_text);
        let tst = response.token.as_ref().unwrap().tst_info();
        let (gen, accuracy) = (tst.gen_time.unix_ns(), tst.accuracy.unwrap().as_ns());
        assert!(gen + accuracy >= sent && gen - accuracy <= received);
    }
    assert!(ready(&server));

    servers[0].set(|b| b.silent = false);
    wait_for(
        || clock_report(&server).contains("State       : synchronized"),
        "synchronized again",
        Duration::from_secs(10),
    );

    servers[1].set(|b| b.silent = true);
    servers[2].set(|b| b.silent = true);
    wait_for(
        || clock_report(&server).contains("too few usable sources: 1,"),
        "holdover on one source",
        Duration::from_secs(10),
    );
    assert!(stamp(&server, work.path()).0.granted());
    servers[0].set(|b| b.offset_ns = 5_000_000_000);
    wait_for(
        || stamp(&server, work.path()).0.fail_info() == Some(FailInfo::TimeNotAvailable),
        "refusal",
        Duration::from_secs(10),
    );
    let report = clock_report(&server);
    assert!(
        report.contains("contradicts the clock's model by +"),
        "{report}"
    );
    assert!(!ready(&server));
}

/// What one request under load got, with the client's send/receive window (Unix ns).
enum Outcome {
    Granted {
        gen: i64,
        accuracy: i64,
        serial: Vec<u8>,
    },
    /// The failInfo and the status text.
    Refused(Option<FailInfo>, String),
}

/// Keep-alive clients stamping without pause, each query its own; every reply must be a
/// DER TimeStampResp over HTTP 200, and a token must carry the query's imprint and nonce.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// When the latest request that got a token was sent (Unix ns; 0 before any).
    last_granted_sent: std::sync::Arc<std::sync::atomic::AtomicI64>,
    clients: Vec<std::thread::JoinHandle<Vec<(i64, i64, Outcome)>>>,
}

impl Load {
    fn start(url: &str, clients: usize) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let last_granted_sent = std::sync::Arc::new(AtomicI64::new(0));
        let clients = (0..clients)
            .map(|id| {
                let (url, stop, last_granted_sent) =
                    (url.to_string(), stop.clone(), last_granted_sent.clone());
                std::thread::spawn(move || {
                    let (_, path) = wire::split_url(&url);
                    let mut conn = wire::Conn::open(&url);
                    let mut seen = Vec::new();
                    for n in 0u32.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let query = wire::query_for(format!("invoice {id}/{n}").as_bytes());
                        let sent = clock::unix_ns() as i64;
                        let reply = conn.post(&path, &query.to_der().unwrap());
                        let received = clock::unix_ns() as i64;
                        assert_eq!(reply.status, 200, "{reply:?}");
                        let response = wire::decode(&reply);
                        let outcome = match response.token {
                            Some(token) => {
                                last_granted_sent.fetch_max(sent, Ordering::Relaxed);
                                let tst = token.tst_info();
                                assert_eq!(
                                    tst.message_imprint.hashed_message.as_bytes(),
                                    query.hashed_message
                                );
                                assert_eq!(
                                    tst.nonce.map(|n| n.as_bytes().to_vec()),
                                    query.nonce.clone()
                                );
                                Outcome::Granted {
                                    gen: tst.gen_time.unix_ns() as i64,
                                    accuracy: tst.accuracy.unwrap().as_ns() as i64,
                                    serial: tst.serial_number.as_bytes().to_vec(),
                                }
                            }
                            None => Outcome::Refused(
                                response.fail_info(),
                                response.status_text.join("; "),
                            ),
                        };
                        seen.push((sent, received, outcome));
                    }
                    seen
                })
            })
            .collect();
        Load {
            stop,
            last_granted_sent,
            clients,
        }
    }

    /// Waits until a request sent after `after` (Unix ns) has got a token.
    fn wait_for_a_token_sent_after(&self, after: i64, what: &str) {
        wait_for(
            || {
                self.last_granted_sent
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > after
            },
            what,
            Duration::from_secs(60),
        );
    }

    /// Stops the clients: what every request got, with its send and receive time.
    fn stop(self) -> Vec<(i64, i64, Outcome)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.clients
            .into_iter()
            .flat_map(|c| c.join().expect("a client thread"))
            .collect()
    }
}

/// Eight keep-alive clients stamp without pause while every source goes silent and later
/// comes back. Every reply is a token whose genTime ± accuracy holds the references' time of
/// its exchange, or a timeNotAvailable refusal; once a refusal has been received, no request
/// sent after it gets a token until the sources return; then tokens come again. genTimes and
/// serials stay unique throughout.
#[test]
fn under_load_the_tsa_stops_for_good_when_it_can_no_longer_vouch_for_its_time() {
    let offset = 3_000_000_000i64;
    let servers = ntp_servers(3, offset);
    let server = synchronized_tsa(
        &servers,
        "max_drift_ppm = 200000.0\nmax_sample_age_ms = 400\n",
    );
    let load = Load::start(&server.url, 8);
    load.wait_for_a_token_sent_after(0, "tokens under load");
    let silenced = clock::unix_ns() as i64;
    for s in &servers {
        s.set(|b| b.silent = true);
    }
    wait_for(
        || !ready(&server),
        "refusal once the bound passes the accuracy",
        Duration::from_secs(20),
    );
    // A while refused under load, then the sources return.
    std::thread::sleep(Duration::from_millis(1000));
    let restored = clock::unix_ns() as i64;
    for s in &servers {
        s.set(|b| b.silent = false);
    }
    wait_for(
        || ready(&server),
        "resynchronization",
        Duration::from_secs(20),
    );
    load.wait_for_a_token_sent_after(restored, "tokens once the sources came back");
    let seen = load.stop();

    let mut gens = std::collections::HashSet::new();
    let mut serials = std::collections::HashSet::new();
    let mut first_refusal = i64::MAX;
    for (sent, received, outcome) in &seen {
        match outcome {
            Outcome::Granted {
                gen,
                accuracy,
                serial,
            } => {
                assert!(*accuracy <= 1_000_000_000, "accuracy {accuracy} ns");
                let (lo, hi) = (sent + offset, received + offset);
                assert!(
                    gen + accuracy >= lo && gen - accuracy <= hi,
                    "genTime {gen} ± {accuracy} outside [{lo}, {hi}]"
                );
                assert!(gens.insert(*gen), "genTime {gen} issued twice");
                assert!(serials.insert(serial.clone()), "serial issued twice");
            }
            Outcome::Refused(fail_info, text) => {
                assert_eq!(*fail_info, Some(FailInfo::TimeNotAvailable));
                // Before the silence, only a reading behind the last genTime may be refused:
                // on a loaded machine an update can move the estimate back by milliseconds.
                assert!(
                    *received > silenced || text.contains("stepped back"),
                    "refused before the sources went silent: {text}"
                );
                if *received <= silenced {
                    continue;
                }
                // A signature that came back too late for its genTime is refused alone (the
                // next one may come in time): only the clock's own refusals stop issuance.
                if *received < restored && !text.contains("came back too late") {
                    first_refusal = first_refusal.min(*received);
                }
            }
        }
    }
    assert!(
        first_refusal < restored,
        "no refusal while the sources were silent"
    );
    let count = |from: i64, to: i64| {
        seen.iter()
            .filter(|(sent, _, outcome)| {
                matches!(outcome, Outcome::Granted { .. }) && *sent > from && *sent < to
            })
            .count()
    };
    let late = seen
        .iter()
        .filter(|(_, _, o)| matches!(o, Outcome::Refused(_, text) if text.contains("came back too late")))
        .count();
    eprintln!(
        "{} replies: {} tokens before the silence, {} in holdover, {} after a refusal, {} after \
         the sources returned; {late} signatures too late",
        seen.len(),
        count(i64::MIN, silenced),
        count(silenced, first_refusal),
        count(first_refusal, restored),
        count(restored, i64::MAX)
    );
    assert_eq!(
        count(first_refusal, restored),
        0,
        "a token was issued after a refusal while the sources stayed silent"
    );
    assert!(
        count(silenced, first_refusal) > 0,
        "no tokens in holdover while the bound was within the accuracy"
    );
    assert!(
        count(restored, i64::MAX) > 0,
        "no tokens once the sources came back"
    );
}

/// Under load, every reference steps 5 s ahead, and later back. Each token's genTime ±
/// accuracy holds the references' time of its exchange on one timescale or the other, never
/// in between. Once a token on the new timescale has been received, no request sent after it
/// gets one on the old. While a step awaits confirmation every request is refused with
/// timeNotAvailable. After the step back, no genTime repeats or goes back: requests are
/// refused until the references' time passes the last genTime.
#[test]
fn under_load_a_step_of_the_references_is_refused_then_followed_without_mixing() {
    let step = 5_000_000_000i64;
    let servers = ntp_servers(3, 0);
    let server = synchronized_tsa(&servers, "");
    let load = Load::start(&server.url, 6);
    load.wait_for_a_token_sent_after(0, "tokens before the step");
    let stepped = clock::unix_ns() as i64;
    for s in &servers {
        s.set(|b| b.offset_ns = step);
    }
    wait_for(
        || clock_report(&server).contains("Offset      : +5.0"),
        "the step followed",
        Duration::from_secs(15),
    );
    load.wait_for_a_token_sent_after(
        clock::unix_ns() as i64,
        "tokens after the step was followed",
    );
    let back = clock::unix_ns() as i64;
    for s in &servers {
        s.set(|b| b.offset_ns = 0);
    }
    wait_for(
        || clock_report(&server).contains("Offset      : +0.0"),
        "the step back followed",
        Duration::from_secs(15),
    );
    // Refused until the references' time passes the last genTime (5 s ahead) again.
    load.wait_for_a_token_sent_after(
        clock::unix_ns() as i64,
        "tokens after the step back was followed",
    );
    let mut seen = load.stop();
    seen.sort_by_key(|(sent, ..)| *sent);

    // Which timescale each token holds: 0 (before the step, or after the step back) or `step`.
    let scale = |sent: i64, received: i64, gen: i64, accuracy: i64| {
        [0, step]
            .into_iter()
            .find(|o| gen + accuracy >= sent + o && gen - accuracy <= received + o)
    };
    let mut first_new_received = i64::MAX;
    // The latest genTime on the new timescale, which those after the step back must pass.
    let last_new_gen = seen
        .iter()
        .filter_map(|(sent, received, outcome)| match outcome {
            Outcome::Granted { gen, accuracy, .. } => {
                (scale(*sent, *received, *gen, *accuracy) == Some(step)).then_some(*gen)
            }
            Outcome::Refused(..) => None,
        })
        .max()
        .unwrap_or(0);
    let mut gens = std::collections::HashSet::new();
    let (mut granted, mut refused) = ([0usize; 3], 0usize);
    for (sent, received, outcome) in &seen {
        match outcome {
            Outcome::Granted { gen, accuracy, .. } => {
                let on = scale(*sent, *received, *gen, *accuracy).unwrap_or_else(|| {
                    panic!("genTime {gen} ± {accuracy} on neither timescale [{sent}, {received}]")
                });
                assert!(gens.insert(*gen), "genTime {gen} issued twice");
                if on == step {
                    first_new_received = first_new_received.min(*received);
                    granted[1] += 1;
                } else if *sent < back {
                    assert!(
                        *sent < first_new_received,
                        "a token on the old timescale after one on the new"
                    );
                    granted[0] += 1;
                } else {
                    // After the step back: later than every genTime on the new timescale.
                    assert!(
                        *gen > last_new_gen,
                        "genTime {gen} not after {last_new_gen}"
                    );
                    granted[2] += 1;
                }
            }
            Outcome::Refused(fail_info, _) => {
                assert_eq!(*fail_info, Some(FailInfo::TimeNotAvailable));
                assert!(*received > stepped, "refused before the step");
                refused += 1;
            }
        }
    }
    eprintln!(
        "{} replies: {} tokens before the step, {} after it, {} after the step back, {refused} \
         refused",
        seen.len(),
        granted[0],
        granted[1],
        granted[2]
    );
    assert!(granted.iter().all(|n| *n > 0), "{granted:?}");
    assert!(refused > 0, "the step was never refused");
}

#[test]
fn unsynchronized_leap_indicator_and_kiss_of_death_make_sources_unusable() {
    let mut servers = ntp_servers(3, 0);
    servers.push(NtpServer::start(Behaviour {
        leap: 3,
        ..Default::default()
    }));
    servers.push(NtpServer::start(Behaviour {
        kod: Some(*b"DENY"),
        ..Default::default()
    }));
    let server = synchronized_tsa(&servers, "");
    // Of five, only the three good sources are usable: they are the majority.
    wait_for(
        || {
            let report = clock_report(&server);
            count(&report, "selected") == 3 && count(&report, "unusable") == 2
        },
        "three selected and two unusable sources",
        Duration::from_secs(5),
    );
    // DENY: polled once, and not again for an hour.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        servers[4]
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert!(
        servers[3]
            .requests
            .load(std::sync::atomic::Ordering::SeqCst)
            > 1
    );
}

/// Routine synchronizations are recorded, not only changes of state (ETSI EN 319 421): the
/// archive holds a `clock_sync` event naming the sources the update selected.
#[test]
fn routine_synchronizations_are_archived() {
    let servers = ntp_servers(3, 0);
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let server = clock::tsa_disciplined_init(&["--archive"], &addrs, "");
    wait_for(
        || ready(&server),
        "synchronization",
        Duration::from_secs(10),
    );
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    let events = || {
        // A token's commit takes the events queued before it along.
        assert!(stamp(&server, work.path()).0.granted());
        let out = common::ok(
            std::process::Command::new(common::TSA)
                .args(["archive", "--config"])
                .arg(server.path("tsa.toml"))
                .arg("events")
                .env("RUST_LOG", "error"),
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let mut listed = String::new();
    wait_for(
        || {
            listed = events();
            listed.contains("clock_sync")
        },
        "a clock_sync event in the archive",
        Duration::from_secs(20),
    );
    let line = listed
        .lines()
        .find(|l| l.contains("clock_sync"))
        .unwrap()
        .to_string();
    for addr in &addrs {
        assert!(line.contains(&addr.to_string()), "{addr} not in {line}");
    }
    assert!(line.contains("bound_ns"), "{line}");
}

/// A server whose timestamps say it held each request longer than the whole exchange took
/// (no offset fits both directions) gives no samples: it is unusable, not a source of the
/// narrowest delay there is (sntpc clamps a negative delay to its precision).
#[test]
fn a_server_with_inconsistent_timestamps_is_unusable() {
    let mut servers = ntp_servers(3, 0);
    servers.push(NtpServer::start(Behaviour {
        held_ns: 10_000_000,
        ..Default::default()
    }));
    let server = synchronized_tsa(&servers, "");
    wait_for(
        || {
            let report = clock_report(&server);
            count(&report, "selected") == 3 && count(&report, "unusable") == 1
        },
        "three selected sources and the inconsistent one unusable",
        Duration::from_secs(5),
    );
    assert!(
        servers[3]
            .requests
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
    );
}

/// Three of five servers take their time from one server (their reference ID names it) and
/// are 3 s off: they are one source, not a majority, and the two others are none either. The
/// TSA refuses to stamp, and says why; without the reference IDs it would follow the three.
#[test]
fn servers_that_take_their_time_from_one_server_are_not_a_majority() {
    let mut servers: Vec<NtpServer> = (0..3)
        .map(|_| {
            NtpServer::start(Behaviour {
                offset_ns: 3_000_000_000,
                refid: Some([192, 0, 2, 9]),
                ..Default::default()
            })
        })
        .collect();
    servers.extend(ntp_servers(2, 0));
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let server = clock::tsa_disciplined(&addrs, "");
    let mut report = String::new();
    wait_for(
        || {
            report = clock_report(&server);
            report.contains("take their time from the same server")
        },
        "the reason in the clock's report",
        Duration::from_secs(10),
    );
    // The operator's status page lists the event.
    let status = std::process::Command::new("curl")
        .args(["-s", &format!("{}/status", server.admin_url)])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("data-event=\"source_dependent\""),
        "{status}"
    );
    assert!(!ready(&server), "{report}");
    let work = tempfile::tempdir().unwrap();
    query(work.path());
    let (response, _, _) = stamp(&server, work.path());
    assert!(!response.granted(), "{report}");
    assert_eq!(
        response.fail_info(),
        Some(FailInfo::TimeNotAvailable),
        "{report}"
    );
}
