//! Batches (`docs/batch.md`): many `openssl ts -query` requests in one DER SEQUENCE, POSTed
//! by curl as `application/timestamp-query-batch` to a real `tsa serve`; each reply item
//! verified against its own query by `openssl ts -verify` (a sample) and the crate's verifier
//! (all); bad items rejected on their own; malformed and oversized batches refused whole; the
//! archive holding every granted item; `tsa request --batch` end to end; an RSA signer.

mod common;
#[path = "common/wire.rs"]
mod wire;

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::{curl_post, ok, openssl, run, wait_until, Server, TSA};
use tsa::alg::DigestAlgorithm;
use tsa::client::read::Response;
use tsa::client::verify::{verify, Expectation};
use tsa::client::Query;
use tsa::protocol::FailInfo;
use x509_cert::Certificate;

const BATCH_QUERY: &str = "application/timestamp-query-batch";
const BATCH_REPLY: &str = "application/timestamp-reply-batch";
const QUERY: &str = "application/timestamp-query";
const REPLY: &str = "application/timestamp-reply";
const DEV_POLICY: &str = "1.3.6.1.4.1.32473.3161.1";

/// `SEQUENCE OF` around DER items, written here without the crate's encoder: the definite
/// length in the fewest octets.
fn sequence_of(items: &[Vec<u8>]) -> Vec<u8> {
    let content = items.concat();
    let mut out = vec![0x30];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let octets: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | octets.len() as u8);
        out.extend(octets);
    }
    out.extend(content);
    out
}

/// POSTs `body` with curl as `content_type`: (HTTP status, content type, body).
fn post(server: &Server, work: &Path, body: &[u8], content_type: &str) -> (u16, String, Vec<u8>) {
    let file = work.join("batch.der");
    std::fs::write(&file, body).unwrap();
    curl_post(&server.url, &file, content_type)
}

/// POSTs a batch that must be answered: its items, in order.
fn post_batch(server: &Server, work: &Path, items: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let (status, content_type, body) = post(server, work, &sequence_of(items), BATCH_QUERY);
    assert_eq!(
        (status, content_type.as_str()),
        (200, BATCH_REPLY),
        "{}",
        String::from_utf8_lossy(&body)
    );
    // openssl parses the whole reply as DER.
    std::fs::write(work.join("reply.der"), &body).unwrap();
    openssl(
        &["asn1parse", "-inform", "DER", "-in", "reply.der", "-noout"],
        work,
    );
    let replies = tsa::protocol::batch::decode(&body, usize::MAX).expect("a SEQUENCE OF");
    assert_eq!(replies.len(), items.len(), "one reply per item");
    replies.into_iter().map(<[u8]>::to_vec).collect()
}

/// `openssl ts -query` with `args`, written to `work/name`; its DER.
fn openssl_query(work: &Path, name: &str, args: &[String]) -> Vec<u8> {
    let mut all = vec!["ts".to_string(), "-query".into()];
    all.extend_from_slice(args);
    all.extend(["-out".to_string(), name.to_string()]);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    openssl(&all, work);
    std::fs::read(work.join(name)).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn certificates(path: &Path) -> Vec<Certificate> {
    Certificate::load_pem_chain(&std::fs::read(path).unwrap()).unwrap()
}

/// The failInfo of a reply that must be a rejection.
fn fail_info(reply: &[u8]) -> FailInfo {
    let response = Response::from_der(reply).unwrap();
    assert!(!response.granted(), "granted, but a rejection was expected");
    response.fail_info().expect("one failInfo bit")
}

/// Verifies `reply` as the answer to `query` for `digest` with the crate's verifier (CA
/// trusted, the TSU certificate given for tokens issued without it): (serial, genTime ns).
fn verified(server: &Server, reply: &[u8], query: &[u8], digest: &[u8]) -> (String, u64) {
    let response = Response::from_der(reply).unwrap();
    let token = response
        .token
        .as_ref()
        .unwrap_or_else(|| panic!("rejected: {:?}", response.status_text));
    let v = verify(
        token,
        &Expectation {
            digest: Some(digest),
            query: Some(query),
            trusted: certificates(&server.ca()),
            untrusted: certificates(&server.path("tsa-cert.pem")),
            ..Default::default()
        },
    )
    .expect("the token verifies against its own query");
    (v.serial_hex, v.gen_time.unix_ns())
}

/// `openssl ts -verify` of `reply` against `query`, both written into `work`.
fn openssl_verify(server: &Server, work: &Path, i: usize, query: &[u8], reply: &[u8]) {
    let (q, r) = (format!("q{i}.tsq"), format!("r{i}.tsr"));
    std::fs::write(work.join(&q), query).unwrap();
    std::fs::write(work.join(&r), reply).unwrap();
    let (ca, untrusted) = (server.ca(), server.path("tsa-cert.pem"));
    let out = run(Command::new("openssl").current_dir(work).args([
        "ts",
        "-verify",
        "-in",
        &r,
        "-queryfile",
        &q,
        "-CAfile",
        ca.to_str().unwrap(),
        "-untrusted",
        untrusted.to_str().unwrap(),
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Verification: OK"),
        "item {i}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Serials and genTimes all different.
fn assert_distinct(stamps: &[(String, u64)]) {
    let serials: HashSet<_> = stamps.iter().map(|s| &s.0).collect();
    let times: HashSet<_> = stamps.iter().map(|s| s.1).collect();
    assert_eq!(serials.len(), stamps.len(), "serials repeat");
    assert_eq!(times.len(), stamps.len(), "genTimes repeat");
}

fn scrape(server: &Server) -> String {
    let out = ok(Command::new("curl").args(["-sS", &format!("{}/metrics", server.admin_url)]));
    String::from_utf8(out.stdout).unwrap()
}

/// `count` SHA-256 queries, each for the big-endian octets of its number: item `i`'s imprint
/// is the SHA-256 of `(i as u32).to_be_bytes()`.
fn numbered_queries(count: u32) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            Query::for_data(DigestAlgorithm::Sha256, &i.to_be_bytes())
                .unwrap()
                .to_der()
                .unwrap()
        })
        .collect()
}

/// The value of `series` (its name and labels) in scraped `metrics`, as written.
fn sample<'a>(metrics: &'a str, series: &str) -> Option<&'a str> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
}

/// A gauge's value, as the server's metrics give it now.
fn gauge(server: &Server, series: &str) -> f64 {
    sample(&scrape(server), series).map_or(f64::NAN, |v| v.parse().unwrap())
}

fn counter(metrics: &str, series: &str) -> u64 {
    sample(metrics, series).map_or(0, |v| v.parse().unwrap())
}

/// A batch body ten times the connection's read buffer (32 KiB, `server::http`) is read in
/// many reads and answered whole: every item its own token for its own imprint, in order.
#[test]
fn a_batch_far_larger_than_the_read_buffer_is_read_whole() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let items = numbered_queries(5_000);
    assert!(sequence_of(&items).len() > 10 * 32 * 1024);
    let replies = post_batch(&server, work.path(), &items);
    let mut serials = HashSet::new();
    for (i, reply) in replies.iter().enumerate() {
        let token = Response::from_der(reply).unwrap().token.expect("granted");
        let tst = token.tst_info();
        let imprint = DigestAlgorithm::Sha256
            .digest(&(i as u32).to_be_bytes())
            .unwrap();
        assert_eq!(
            tst.message_imprint.hashed_message.as_bytes(),
            imprint,
            "item {i}"
        );
        assert!(
            serials.insert(tst.serial_number.as_bytes().to_vec()),
            "item {i}"
        );
    }
}

#[test]
fn two_hundred_openssl_queries_get_their_own_verified_tokens() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    // 200 queries from openssl: SHA-256/384/512, with and without nonce, certReq, policy.
    let algorithms = [
        DigestAlgorithm::Sha256,
        DigestAlgorithm::Sha384,
        DigestAlgorithm::Sha512,
    ];
    let specs: Vec<(Vec<u8>, Vec<String>)> = (0..200)
        .map(|i| {
            let alg = algorithms[i % 3];
            let digest = alg.digest(format!("invoice {i}").as_bytes()).unwrap();
            let mut args = vec![
                "-digest".to_string(),
                hex(&digest),
                format!("-{}", alg.name()),
            ];
            if i % 4 == 0 {
                args.push("-no_nonce".into());
            }
            if i % 2 == 0 {
                args.push("-cert".into());
            }
            if i % 5 == 0 {
                args.extend(["-tspolicy".into(), DEV_POLICY.into()]);
            }
            (digest, args)
        })
        .collect();
    let queries: Vec<Vec<u8>> = std::thread::scope(|s| {
        let workers: Vec<_> = specs
            .chunks(50)
            .enumerate()
            .map(|(c, chunk)| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .enumerate()
                        .map(|(j, (_, args))| {
                            openssl_query(w, &format!("in{}.tsq", c * 50 + j), args)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let before = scrape(&server);

    let replies = post_batch(&server, w, &queries);

    // Every item verified by the crate against its own query, in order.
    let stamps: Vec<(String, u64)> = replies
        .iter()
        .zip(&queries)
        .zip(&specs)
        .map(|((reply, query), (digest, _))| verified(&server, reply, query, digest))
        .collect();
    assert_distinct(&stamps);
    // Certificates exactly where asked for, nonces echoed (checked by the verifier too).
    for (i, reply) in replies.iter().enumerate() {
        let token = Response::from_der(reply).unwrap().token.unwrap();
        let has_certs = token.signed_data.certificates.is_some();
        assert_eq!(has_certs, i % 2 == 0, "item {i}");
        assert_eq!(token.tst_info().nonce.is_some(), i % 4 != 0, "item {i}");
    }
    // A sample of 20 by openssl, spread over the batch.
    std::thread::scope(|s| {
        for part in [0, 1] {
            let (server, replies, queries) = (&server, &replies, &queries);
            s.spawn(move || {
                for i in (part * 5..200).step_by(10) {
                    openssl_verify(server, w, i, &queries[i], &replies[i]);
                }
            });
        }
    });

    // Each item counted as a request.
    let granted = r#"tsa_requests_total{outcome="granted",fail_info="none"}"#;
    assert_eq!(
        counter(&scrape(&server), granted) - counter(&before, granted),
        200
    );
}

#[test]
fn bad_items_get_their_own_fail_info_and_spoil_nothing() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let digest = DigestAlgorithm::Sha256.digest(b"good").unwrap();
    let q = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        openssl_query(w, "item.tsq", &args)
    };
    let good = q(&["-digest", &hex(&digest), "-sha256", "-cert"]);
    let mut version_2 = good.clone();
    assert_eq!(&version_2[2..5], [0x02, 0x01, 0x01], "version INTEGER 1");
    version_2[4] = 2;
    let short_imprint = Query {
        digest: DigestAlgorithm::Sha256,
        hashed_message: vec![7; 31],
        policy: None,
        nonce: Some(vec![1, 2, 3]),
        cert_req: false,
    }
    .to_der()
    .unwrap();
    let sha512 = DigestAlgorithm::Sha512.digest(b"good").unwrap();
    // Longer than `max_request_bytes` (8 KiB), which a single body may not exceed either.
    let huge_nonce = Query {
        digest: DigestAlgorithm::Sha256,
        hashed_message: digest.clone(),
        policy: None,
        nonce: Some([&[0x7f][..], &[1; 9000]].concat()),
        cert_req: false,
    }
    .to_der()
    .unwrap();

    let items = vec![
        good.clone(),
        short_imprint,
        q(&["-digest", &hex(&digest), "-sha256", "-tspolicy", "1.2.3.4"]),
        q(&["-digest", &"ab".repeat(20), "-sha1"]),
        vec![0x30, 0x00],
        version_2,
        q(&["-digest", &hex(&sha512), "-sha512", "-no_nonce"]),
        good.clone(),
        huge_nonce,
    ];
    let replies = post_batch(&server, w, &items);
    assert_eq!(fail_info(&replies[1]), FailInfo::BadDataFormat);
    assert_eq!(fail_info(&replies[2]), FailInfo::UnacceptedPolicy);
    assert_eq!(fail_info(&replies[3]), FailInfo::BadAlg);
    assert_eq!(fail_info(&replies[4]), FailInfo::BadDataFormat);
    assert_eq!(fail_info(&replies[5]), FailInfo::BadRequest);
    assert_eq!(fail_info(&replies[8]), FailInfo::BadDataFormat);
    let stamps = [
        verified(&server, &replies[0], &items[0], &digest),
        verified(&server, &replies[6], &items[6], &sha512),
        verified(&server, &replies[7], &items[7], &digest),
    ];
    // The same query twice: two tokens.
    assert_distinct(&stamps);
    openssl_verify(&server, w, 6, &items[6], &replies[6]);

    // The reasons are the single path's, and each item is counted with its own failInfo.
    let text = Response::from_der(&replies[3])
        .unwrap()
        .status_text
        .join("; ");
    assert!(text.contains("sha1"), "{text}");
    let metrics = scrape(&server);
    for (fail, n) in [
        ("badDataFormat", 3),
        ("unacceptedPolicy", 1),
        ("badAlg", 1),
        ("badRequest", 1),
    ] {
        let series = format!(r#"tsa_requests_total{{outcome="rejected",fail_info="{fail}"}}"#);
        assert_eq!(counter(&metrics, &series), n, "{fail}");
    }
}

#[test]
fn malformed_or_oversized_batches_are_refused_whole() {
    let server = Server::start(&[], "[server]\nmax_batch_items = 5\nmax_batch_bytes = 4096");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let items: Vec<Vec<u8>> = (0..6)
        .map(|i| {
            Query::for_data(DigestAlgorithm::Sha256, &[i])
                .unwrap()
                .to_der()
                .unwrap()
        })
        .collect();

    let refused = |body: &[u8], status: u16, why: &str| {
        let (code, content_type, reply) = post(&server, w, body, BATCH_QUERY);
        assert_eq!((code, content_type.as_str()), (status, REPLY), "{why}");
        let response = Response::from_der(&reply).expect("one DER TimeStampResp");
        assert_eq!(response.fail_info(), Some(FailInfo::BadDataFormat), "{why}");
        let text = response.status_text.join("; ");
        assert!(text.contains(why), "{text} does not say {why}");
    };
    refused(b"hello", 400, "the outer tag is not SEQUENCE");
    let mut trailing = sequence_of(&items[..2]);
    trailing.push(0);
    refused(&trailing, 400, "trailing octets");
    refused(&[0x30, 0x00], 400, "holds no request");
    refused(&[0x30, 0x80, 0x00, 0x00], 400, "indefinite length");
    refused(&sequence_of(&items[..2])[..40], 400, "runs past the end");
    // A lone request sent as a batch.
    refused(&items[0], 400, "an element is not a SEQUENCE");
    refused(&sequence_of(&items), 413, "more than 5 requests");
    refused(&vec![0x30; 5000], 413, "larger than this TSA accepts");

    // At the limit it is served; single requests are unaffected.
    let replies = post_batch(&server, w, &items[..5]);
    assert!(replies
        .iter()
        .all(|r| Response::from_der(r).unwrap().granted()));
    let (status, content_type, reply) = post(&server, w, &items[5], QUERY);
    assert_eq!((status, content_type.as_str()), (200, REPLY));
    assert!(Response::from_der(&reply).unwrap().granted());
}

/// A batch whose head and first half are sent now, on a connection of its own; the rest
/// waits for [`finish_batch`].
fn start_batch(server: &Server, body: &[u8]) -> wire::Conn {
    start_batch_as(server, body, None)
}

/// [`start_batch`] with an `Authorization` header.
fn start_batch_as(server: &Server, body: &[u8], authorization: Option<&str>) -> wire::Conn {
    let (_, path) = wire::split_url(&server.url);
    let mut conn = wire::Conn::open(&server.url);
    let mut headers = vec![("Content-Type", BATCH_QUERY)];
    headers.extend(authorization.map(|a| ("Authorization", a)));
    let request = wire::request("POST", &path, &headers, body);
    let half = request.len() - body.len() / 2;
    conn.stream.write_all(&request[..half]).unwrap();
    conn
}

/// The rest of a batch that [`start_batch`] began, and its answer.
fn finish_batch(conn: &mut wire::Conn, body: &[u8]) -> wire::Reply {
    conn.stream
        .write_all(&body[body.len() - body.len() / 2..])
        .unwrap();
    conn.read_reply().expect("the batch's answer")
}

/// The batch's refusal for want of a place: 503, `Retry-After: 1`, a DER systemFailure, before
/// its body is read: only the first half of the body is ever sent (a server that waited for
/// the rest would answer 408 at its read timeout instead).
fn assert_refused_at_once(server: &Server, body: &[u8]) {
    assert_refused(start_batch(server, body));
}

/// The same refusal read by a client that sends its whole upload (3 MiB, more than the
/// sockets' buffers hold) before it reads, without `Expect: 100-continue`: the 503 and its
/// body, not a reset (a socket closed with unread data sends one, and the client then loses
/// the answer).
fn assert_refused_while_sending(server: &Server) {
    let (_, path) = wire::split_url(&server.url);
    let conn = wire::Conn::open(&server.url);
    let body = vec![0u8; 3 << 20];
    let request = wire::request("POST", &path, &[("Content-Type", BATCH_QUERY)], &body);
    let mut writer = conn.stream.try_clone().unwrap();
    // Cut short where the server stops reading: what counts is the answer.
    let sender = std::thread::spawn(move || writer.write_all(&request));
    // Read once the server is done with the connection.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert_refused(conn);
    let _ = sender.join();
}

/// [`assert_refused_at_once`] for a batch already begun.
fn assert_refused(mut conn: wire::Conn) {
    let reply = conn
        .read_reply()
        .expect("an answer while half the body was unsent");
    assert_eq!(
        (reply.status, reply.header("content-type")),
        (503, Some(REPLY)),
        "{reply:?}"
    );
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(fail_info(&reply.body), FailInfo::SystemFailure);
}

#[test]
fn past_max_batches_in_flight_a_batch_gets_503_before_its_body_is_read() {
    let server = Server::start(
        &[],
        "[server]\nmax_batches_in_flight = 1\nread_timeout_ms = 3000\n",
    );
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let items = numbered_queries(200);
    let body = sequence_of(&items);

    // One batch upload held half-way takes the only place.
    let mut first = start_batch(&server, &body);
    wait_until(
        || gauge(&server, "tsa_batches_in_flight") == 1.0,
        "the upload to take its place",
    );
    assert_refused_at_once(&server, &body);
    assert_refused_while_sending(&server);
    // Single requests are not held back by it.
    let (status, _, reply) = post(&server, w, &items[0], QUERY);
    assert_eq!(status, 200);
    assert!(Response::from_der(&reply).unwrap().granted());

    // Once the first batch is whole it is answered, and the place is free again.
    let reply = finish_batch(&mut first, &body);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some(BATCH_REPLY));
    assert_eq!(post_batch(&server, w, &items[..10]).len(), 10);

    // A stalled upload holds its place until the read timeout ends it (408).
    let mut stalled = start_batch(&server, &body);
    wait_until(
        || gauge(&server, "tsa_batches_in_flight") == 1.0,
        "the stalled upload to take its place",
    );
    assert_refused_at_once(&server, &body);
    let reply = stalled.read_reply().expect("the stalled batch's refusal");
    assert_eq!(reply.status, 408);
    assert_eq!(post_batch(&server, w, &items[..10]).len(), 10);

    let metrics = scrape(&server);
    assert_eq!(
        counter(&metrics, "tsa_overload_refusals_total{limit=\"batches\"}"),
        3
    );
}

/// One client address cannot take every batch place with slow uploads: while
/// `max_connections_per_address` is set, a batch from an address that already has half of
/// `max_batches_in_flight` in flight gets 503 before its body is read, while a batch from
/// another address (127.0.0.2: the whole 127.0.0.0/8 is loopback) finds a place and is
/// answered; a finished batch gives its address its place back.
#[test]
fn an_address_with_half_the_batch_places_in_flight_gets_503_for_another() {
    let server = Server::start(
        &[],
        "[server]\nmax_batches_in_flight = 4\nmax_connections_per_address = 8\n\
         read_timeout_ms = 5000\n",
    );
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let items = numbered_queries(200);
    let body = sequence_of(&items);

    // Two uploads from 127.0.0.1 held half-way: its two places of the four.
    let mut first = start_batch(&server, &body);
    let _second = start_batch(&server, &body);
    wait_until(
        || gauge(&server, "tsa_batches_in_flight") == 2.0,
        "both uploads to take their places",
    );
    assert_refused_at_once(&server, &body);

    // Another address's batch is answered: the places of all were not taken.
    let (_, path) = wire::split_url(&server.url);
    let mut other = wire::Conn::open_from(&server.url, "127.0.0.2");
    let request = wire::request("POST", &path, &[("Content-Type", BATCH_QUERY)], &body);
    other.stream.write_all(&request).unwrap();
    let reply = other.read_reply().expect("the other address's answer");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some(BATCH_REPLY));

    // Once the first batch is whole it is answered, and its address has a place again.
    let reply = finish_batch(&mut first, &body);
    assert_eq!(reply.status, 200);
    assert_eq!(post_batch(&server, w, &items[..10]).len(), 10);

    let metrics = scrape(&server);
    assert_eq!(
        counter(
            &metrics,
            "tsa_overload_refusals_total{limit=\"batches_per_address\"}"
        ),
        1
    );
    assert_eq!(
        counter(&metrics, "tsa_overload_refusals_total{limit=\"batches\"}"),
        0
    );
}

/// Behind a balancer every connection has the same address. While `[auth]` names clients,
/// the anonymous callers together hold at most half of `max_batches_in_flight`, so a named
/// client's batch finds a place beside their slow uploads; and a named client holds at most
/// its own half.
#[test]
fn anonymous_uploads_leave_a_named_client_its_batch_places() {
    let (key, client_toml) = common::new_key("platform", &[]);
    let server = Server::start(
        &[],
        &format!(
            "[server]\nmax_batches_in_flight = 4\nread_timeout_ms = 5000\n\
             [auth]\nanonymous = true\n{client_toml}"
        ),
    );
    let bearer = format!("Bearer {key}");
    let items = numbered_queries(200);
    let body = sequence_of(&items);

    // Two anonymous uploads held half-way: the anonymous callers' two places of the four.
    let mut anonymous = start_batch(&server, &body);
    let _anonymous = start_batch(&server, &body);
    wait_until(
        || gauge(&server, "tsa_batches_in_flight") == 2.0,
        "both anonymous uploads to take their places",
    );
    assert_refused_at_once(&server, &body);

    // The named client's two batches take the other two places; a third of its own is
    // refused as over its share, although it is the same address as the anonymous ones.
    let mut named = start_batch_as(&server, &body, Some(&bearer));
    let _named = start_batch_as(&server, &body, Some(&bearer));
    wait_until(
        || gauge(&server, "tsa_batches_in_flight") == 4.0,
        "the named client's uploads to take their places",
    );
    assert_refused(start_batch_as(&server, &body, Some(&bearer)));

    for conn in [&mut named, &mut anonymous] {
        let reply = finish_batch(conn, &body);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some(BATCH_REPLY));
        let replies = tsa::protocol::batch::decode(&reply.body, usize::MAX).expect("a batch");
        assert_eq!(replies.len(), items.len());
        assert!(replies
            .iter()
            .all(|r| Response::from_der(r).unwrap().granted()));
    }

    let metrics = scrape(&server);
    assert_eq!(
        counter(
            &metrics,
            "tsa_overload_refusals_total{limit=\"batches_per_client\"}"
        ),
        2
    );
    assert_eq!(
        counter(&metrics, "tsa_overload_refusals_total{limit=\"batches\"}"),
        0
    );
}

#[test]
fn archived_batches_record_every_granted_item_before_replying() {
    // Rows: the database's lock below stops their commits (the token log is written beside
    // the database).
    let server = Server::start(
        &["--archive"],
        "[archive]\nbusy_timeout_ms = 200\nlayout = \"rows\"",
    );
    let work = tempfile::tempdir().unwrap();
    let items: Vec<Vec<u8>> = (0..60u8)
        .map(|i| {
            let mut query = Query::for_data(DigestAlgorithm::Sha384, &[i]).unwrap();
            if i % 10 == 3 {
                query.policy = Some("1.2.3.4".parse().unwrap()); // unacceptedPolicy
            }
            query.to_der().unwrap()
        })
        .collect();
    let replies = post_batch(&server, work.path(), &items);

    let mut store =
        tsa::archive::sqlite::SqliteStore::open_read_only(&server.path("archive.sqlite")).unwrap();
    use tsa::archive::store::ArchiveStore;
    let mut granted = 0;
    for (i, reply) in replies.iter().enumerate() {
        let response = Response::from_der(reply).unwrap();
        let Some(token) = response.token else {
            assert_eq!(i % 10, 3, "item {i} was refused");
            assert_eq!(response.fail_info(), Some(FailInfo::UnacceptedPolicy));
            continue;
        };
        granted += 1;
        let tst = token.tst_info();
        let stored = store
            .record_by_serial(tst.serial_number.as_bytes())
            .unwrap()
            .unwrap_or_else(|| panic!("item {i} is not in the archive"));
        assert_eq!(stored.record.token, token.der, "item {i}");
        assert_eq!(
            stored.response(),
            *reply,
            "item {i}: the archived reply is the one sent"
        );
        assert_eq!(
            stored.record.imprint,
            tst.message_imprint.hashed_message.as_bytes()
        );
    }
    assert_eq!(granted, 54);
    let rows: i64 = store
        .connection()
        .query_row("SELECT count(*) FROM tokens", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 54, "only the granted items are archived");

    // While the database cannot be written, no token leaves: the items that would be granted
    // are systemFailure, the others keep their own failInfo.
    let locker = rusqlite::Connection::open(server.path("archive.sqlite")).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let replies = post_batch(&server, work.path(), &items[..5]);
    for (i, reply) in replies.iter().enumerate() {
        let response = Response::from_der(reply).unwrap();
        let expected = match i {
            3 => FailInfo::UnacceptedPolicy,
            _ => FailInfo::SystemFailure,
        };
        assert_eq!(response.fail_info(), Some(expected), "item {i}");
        if i != 3 {
            let text = response.status_text.join("; ");
            assert!(text.contains("archived"), "{text}");
        }
    }
    locker.execute_batch("ROLLBACK").unwrap();
    // The writer tries again once a second: ready again, then granted again.
    let ready = format!("{}/health/ready", server.admin_url);
    wait_until(
        || {
            let code = ok(Command::new("curl").args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &ready,
            ]));
            code.stdout == b"200"
        },
        "readiness once the archive can be written again",
    );
    let replies = post_batch(&server, work.path(), &items[..5]);
    let granted = replies
        .iter()
        .filter(|r| Response::from_der(r).unwrap().granted())
        .count();
    assert_eq!(granted, 4, "granted again once the archive can be written");
}

#[test]
fn tsa_request_batch_stamps_files_and_digests_in_few_round_trips() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let files: Vec<String> = (0..25)
        .map(|i| {
            let name = format!("invoice-{i}.xml");
            std::fs::write(w.join(&name), format!("<invoice n='{i}'/>")).unwrap();
            name
        })
        .collect();
    let ca = server.ca();
    let request = |args: &[&str]| {
        run(Command::new(TSA)
            .current_dir(w)
            .args(["request", "--batch", "--url", &server.url])
            .args(args))
    };

    let mut args = vec![
        "--ca",
        ca.to_str().unwrap(),
        "--save-queries",
        "--batch-size",
        "10",
    ];
    args.extend(files.iter().map(String::as_str));
    let out = request(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("25 of 25 granted and verified (3 batches)"),
        "{stdout}"
    );
    for (i, file) in files.iter().enumerate().step_by(8) {
        // openssl checks each reply against the data and against the saved query.
        let tsr = format!("{file}.tsr");
        let out = openssl(
            &[
                "ts",
                "-verify",
                "-data",
                file,
                "-in",
                &tsr,
                "-CAfile",
                ca.to_str().unwrap(),
            ],
            w,
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("Verification: OK"));
        let query = std::fs::read(w.join(format!("{file}.tsq"))).unwrap();
        let reply = std::fs::read(w.join(&tsr)).unwrap();
        openssl_verify(&server, w, i, &query, &reply);
    }

    // Digests from a list (with a comment and a blank line), replies in --out-dir.
    let digests: Vec<Vec<u8>> = (0..4)
        .map(|i| DigestAlgorithm::Sha512.digest(&[i]).unwrap())
        .collect();
    let list: String = digests.iter().map(|d| format!("{}\n\n", hex(d))).collect();
    std::fs::write(w.join("list.txt"), format!("# invoices\n{list}")).unwrap();
    let out = request(&[
        "--digests",
        "list.txt",
        "--hash",
        "sha512",
        "--out-dir",
        "out",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 of 4 granted and checked"));
    for d in &digests {
        let tsr = w.join("out").join(format!("{}.tsr", hex(d)));
        let out = openssl(
            &[
                "ts",
                "-verify",
                "-digest",
                &hex(d),
                "-in",
                tsr.to_str().unwrap(),
                "-CAfile",
                ca.to_str().unwrap(),
            ],
            w,
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("Verification: OK"));
    }

    // Items the TSA rejects fail the command, each reported; a rejection is saved where no
    // file was, and never over a token that is there.
    let token_before = std::fs::read(w.join(format!("{}.tsr", files[0]))).unwrap();
    std::fs::write(w.join("new-invoice.xml"), "<invoice n='new'/>").unwrap();
    // Without --force nothing is sent where a reply file is there already.
    let out = request(&["--policy", "1.2.3.4", &files[0], "new-invoice.xml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("exists already") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(!w.join("new-invoice.xml.tsr").exists(), "nothing sent");
    let out = request(&[
        "--force",
        "--policy",
        "1.2.3.4",
        &files[0],
        "new-invoice.xml",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.matches("unacceptedPolicy").count(), 2, "{stderr}");
    assert!(stderr.contains("2 of 2 items were not granted"), "{stderr}");
    assert!(stderr.contains("is kept as it was"), "{stderr}");
    assert_eq!(
        std::fs::read(w.join(format!("{}.tsr", files[0]))).unwrap(),
        token_before,
        "the earlier token is kept"
    );
    let saved = std::fs::read(w.join("new-invoice.xml.tsr")).unwrap();
    assert_eq!(fail_info(&saved), FailInfo::UnacceptedPolicy);
    // A file stamped together with the file its reply would be saved as: refused before
    // anything is sent (the reply would replace it).
    let out = request(&[&files[2], &format!("{}.tsr", files[2])]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("would be replaced"), "{stderr}");
    // Bad input is refused before anything is sent.
    std::fs::write(w.join("bad.txt"), "abcd\n").unwrap();
    let out = request(&["--digests", "bad.txt"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.txt line 1") && stderr.contains("32 octets"),
        "{stderr}"
    );
    let out = request(&[&files[0], &files[0]]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("would overwrite"));
}

/// A batch refused as a whole (here 429: the anonymous quota, 4 tokens refilling at one a
/// second, spent by the first batch of 4) fails its items, and the next batches are still
/// sent; the run fails, and a later one with --skip-existing asks only for the items whose
/// reply file does not hold their token: none there, or a rejection (replaced); a file
/// holding another token is not replaced (and a plain rerun is refused: replies are there).
#[test]
fn tsa_request_batch_goes_on_past_a_refused_batch_and_resumes() {
    let server = Server::start(
        &[],
        "[auth]\nanonymous_rate_per_s = 1\nanonymous_burst = 4\n",
    );
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let files: Vec<String> = (0..7)
        .map(|i| {
            let name = format!("receipt-{i}.xml");
            std::fs::write(w.join(&name), format!("<receipt n='{i}'/>")).unwrap();
            name
        })
        .collect();
    let request = |extra: &[&str]| {
        let out = run(Command::new(TSA)
            .current_dir(w)
            .args([
                "request",
                "--batch",
                "--url",
                &server.url,
                "--batch-size",
                "4",
            ])
            .args(extra)
            .args(&files));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = request(&[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("receipt-4.xml … receipt-6.xml (3 items)"),
        "{text}"
    );
    assert!(text.contains("request quota exceeded"), "{text}");
    assert!(text.contains("4 of 7 granted"), "{text}");
    assert!(text.contains("--skip-existing"), "{text}");
    let saved = |i: usize| w.join(format!("{}.tsr", files[i])).exists();
    assert!((0..4).all(saved) && !(4..7).any(saved), "{text}");

    let (ok, text) = request(&[]);
    assert!(!ok && text.contains("exists already"), "{text}");
    // Another item's token where receipt-4's reply goes: not replaced, nothing sent.
    let tsr = |i: usize| w.join(format!("{}.tsr", files[i]));
    std::fs::copy(tsr(0), tsr(4)).unwrap();
    let (ok, text) = request(&["--skip-existing"]);
    assert!(
        !ok && text.contains("receipt-4.xml.tsr exists already"),
        "{text}"
    );
    std::fs::remove_file(tsr(4)).unwrap();
    // A rejection where receipt-5's goes (status 2, no token): asked again, replaced.
    std::fs::write(tsr(5), [0x30, 0x05, 0x30, 0x03, 0x02, 0x01, 0x02]).unwrap();
    // The quota has 3 tokens again (one a second).
    std::thread::sleep(std::time::Duration::from_millis(3_200));
    let (ok, text) = request(&["--skip-existing"]);
    assert!(ok, "{text}");
    assert!(text.contains("4 of 7 items left out"), "{text}");
    assert!(text.contains("3 of 3 granted"), "{text}");
    for (i, file) in files.iter().enumerate() {
        let reply = std::fs::read(tsr(i)).unwrap();
        assert!(Response::from_der(&reply).unwrap().granted(), "{file}");
    }
    let (ok, text) = request(&["--skip-existing"]);
    assert!(ok && text.contains("nothing to stamp"), "{text}");
    // A run that asks for another policy: the tokens there do not carry it, so they are not
    // this run's to skip, nor to replace.
    let (ok, text) = request(&["--skip-existing", "--policy", "1.2.3.4"]);
    assert!(!ok && text.contains("exists already"), "{text}");
}

#[test]
fn rsa_batches_sign_on_the_blocking_pool_beside_single_requests() {
    let server = Server::start(&["--algorithm", "rsa2048"], "");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let digests: Vec<Vec<u8>> = (0..48u8)
        .map(|i| DigestAlgorithm::Sha256.digest(&[i]).unwrap())
        .collect();
    let queries: Vec<Vec<u8>> = digests
        .iter()
        .enumerate()
        .map(|(i, d)| {
            Query {
                digest: DigestAlgorithm::Sha256,
                hashed_message: d.clone(),
                policy: None,
                nonce: (i % 3 != 0).then(|| vec![1, i as u8 + 1]),
                cert_req: i % 2 == 0,
            }
            .to_der()
            .unwrap()
        })
        .collect();

    // Single requests while the batch is being signed are answered too.
    let singles = tempfile::tempdir().unwrap();
    std::fs::write(singles.path().join("single.tsq"), &queries[1]).unwrap();
    let (replies, single_replies) = std::thread::scope(|s| {
        let single = s.spawn(|| {
            (0..5)
                .map(|_| curl_post(&server.url, &singles.path().join("single.tsq"), QUERY))
                .collect::<Vec<_>>()
        });
        (post_batch(&server, w, &queries), single.join().unwrap())
    });
    for (status, _, body) in single_replies {
        assert_eq!(status, 200);
        assert!(Response::from_der(&body).unwrap().granted());
    }
    let stamps: Vec<(String, u64)> = replies
        .iter()
        .zip(&queries)
        .zip(&digests)
        .map(|((reply, query), digest)| verified(&server, reply, query, digest))
        .collect();
    assert_distinct(&stamps);
    for i in [0, 1, 46, 47] {
        openssl_verify(&server, w, i, &queries[i], &replies[i]);
    }
}

/// A batch's reply holds its place under `max_batches_in_flight` while it is sent, not only
/// until it is signed: a client that reads the head of a large reply and then
/// nothing (a small receive buffer) keeps the only place, so another batch gets 503; once it
/// reads on, the reply is whole (its `Content-Length`, `Connection: close`, every answer) and
/// the place is free again.
#[test]
fn a_batch_reply_holds_its_place_while_it_is_sent() {
    use std::io::Read;
    let server = Server::start(
        &[],
        "[server]\nmax_batches_in_flight = 1\nwrite_timeout_ms = 60000\n",
    );
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // Some 7 MB of answers: more than the sockets' buffers hold between the two ends.
    let items = numbered_queries(10_000);
    let body = sequence_of(&items);

    let (authority, path) = wire::split_url(&server.url);
    let mut slow = wire::connect_with_small_receive_buffer(&authority);
    slow.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let request = wire::request("POST", &path, &[("Content-Type", BATCH_QUERY)], &body);
    slow.write_all(&request).unwrap();

    // The head, then nothing read for a while.
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        let n = slow.read(&mut chunk).unwrap();
        assert!(n > 0, "the connection closed before the reply's head");
        got.extend_from_slice(&chunk[..n]);
        if let Some(at) = wire::find(&got, b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a Content-Length")
        .trim()
        .parse()
        .unwrap();
    assert!(length > 5_000_000, "{length} octets");
    assert_eq!(gauge(&server, "tsa_batches_in_flight"), 1.0);
    assert_refused_at_once(&server, &sequence_of(&items[..10]));

    // Read on: the whole reply, every answer granted, then the end of the connection.
    let mut reply = got[head_end..].to_vec();
    slow.read_to_end(&mut reply).unwrap();
    assert_eq!(reply.len(), length);
    let answers = tsa::protocol::batch::decode(&reply, usize::MAX).expect("a SEQUENCE OF");
    assert_eq!(answers.len(), items.len());
    assert!(answers
        .iter()
        .all(|a| Response::from_der(a).unwrap().granted()));
    wait_until(
        || gauge(&server, "tsa_batches_in_flight") == 0.0,
        "the place to be free once the reply was taken",
    );
    assert_eq!(post_batch(&server, w, &items[..10]).len(), 10);
}

/// Anonymous callers share one bucket: a batch of more items than their burst is refused
/// (413) instead of leaving that bucket in debt for all of them; one within it is served.
#[test]
fn an_anonymous_batch_larger_than_the_shared_burst_is_refused() {
    let server = Server::start(
        &[],
        "[auth]\nanonymous = true\nanonymous_rate_per_s = 10\nanonymous_burst = 20\n",
    );
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let items = numbered_queries(21);
    let (status, content_type, reply) = post(&server, w, &sequence_of(&items), BATCH_QUERY);
    assert_eq!((status, content_type.as_str()), (413, REPLY));
    assert_eq!(fail_info(&reply), FailInfo::BadRequest);
    let text = Response::from_der(&reply).unwrap().status_text.join(" ");
    assert!(text.contains("anonymous_burst"), "{text}");
    // One token was taken (as from any batch refused before its items are taken: it held a
    // place while its body came), the rest of the burst is whole for a batch within it.
    assert_eq!(post_batch(&server, w, &items[..19]).len(), 19);
}
