//! The HTTP face of the TSA over real loopback connections: every status of the table in
//! `src/server/http.rs`, the certificate and health endpoints, keep-alive, the read timeout
//! against slow clients, and genTime against the client's own clock, alone and under load.

mod common;
#[path = "common/wire.rs"]
mod wire;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{ok, openssl, Server};
use tsa::alg::DigestAlgorithm;
use tsa::client::read::Response;
use tsa::protocol::FailInfo;
use wire::{
    assert_rejection, assert_serves, decode, find, query_for, split_url, Conn, Reply, QUERY_TYPE,
};

/// curl with `args`; returns (stdout, stderr).
fn curl(args: &[&str]) -> (String, String) {
    let out = ok(Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args));
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn settings(server: &Server) -> toml::Table {
    std::fs::read_to_string(server.path("tsa.toml"))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn other_methods_on_the_stamp_path_are_405_with_allow_post() {
    let server = Server::start(&[], "");
    let work = tempfile::tempdir().unwrap();
    let headers = work.path().join("headers.txt");
    let body = work.path().join("body.der");
    let (code, _) = curl(&[
        "-X",
        "GET",
        "-D",
        headers.to_str().unwrap(),
        "-o",
        body.to_str().unwrap(),
        "-w",
        "%{http_code}",
        &server.url,
    ]);
    assert_eq!(code, "405");
    let headers = std::fs::read_to_string(&headers).unwrap();
    assert!(
        headers
            .lines()
            .any(|l| l.to_ascii_lowercase().trim() == "allow: post"),
        "{headers}"
    );
    let reply = Response::from_der(&std::fs::read(&body).unwrap()).expect("a DER reply");
    assert_eq!(reply.status, 2);
    assert_eq!(reply.fail_info(), Some(FailInfo::BadRequest));

    let (_, path) = split_url(&server.url);
    let mut conn = Conn::open(&server.url);
    for method in ["PUT", "DELETE", "PATCH"] {
        conn.send(method, &path, &[("Content-Type", QUERY_TYPE)], b"");
        let reply = conn.read_reply().unwrap();
        assert_eq!(reply.status, 405, "{method}");
        assert_eq!(reply.header("allow"), Some("POST"), "{method}");
        assert_rejection(&reply, FailInfo::BadRequest);
    }
    // POST on the same path and connection is a stamp.
    let reply = conn.post(&path, &query_for(b"after 405").to_der().unwrap());
    assert_eq!(reply.status, 200);
    assert!(decode(&reply).granted());
}

#[test]
fn another_media_type_is_415() {
    let server = Server::start(&[], "");
    let (_, path) = split_url(&server.url);
    let query = query_for(b"media types").to_der().unwrap();
    let mut conn = Conn::open(&server.url);
    for content_type in [
        Some("text/plain"),
        Some("application/octet-stream"),
        Some("application/timestamp-reply"),
        Some("application/timestamp-query-x"),
        None,
    ] {
        let headers: Vec<(&str, &str)> = content_type
            .map(|t| vec![("Content-Type", t)])
            .unwrap_or_default();
        conn.send("POST", &path, &headers, &query);
        let reply = conn.read_reply().unwrap();
        assert_eq!(reply.status, 415, "{content_type:?}");
        assert_rejection(&reply, FailInfo::BadDataFormat);
    }
    // Case and parameters do not matter (RFC 9110 8.3.1).
    conn.send(
        "POST",
        &path,
        &[(
            "Content-Type",
            "Application/TimeStamp-Query; charset=binary",
        )],
        &query,
    );
    let reply = conn.read_reply().unwrap();
    assert_eq!(reply.status, 200);
    assert!(decode(&reply).granted());

    // curl's default form type is refused too.
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("req.tsq");
    std::fs::write(&file, &query).unwrap();
    let (code, _) = curl(&[
        "--data-binary",
        &format!("@{}", file.display()),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &server.url,
    ]);
    assert_eq!(code, "415");
}

#[test]
fn a_body_over_max_request_bytes_is_413() {
    let server = Server::start(&[], "[server]\nmax_request_bytes = 100\n");
    let max = settings(&server)["server"]["max_request_bytes"]
        .as_integer()
        .unwrap() as usize;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    // A real query under the limit is stamped; one over it is not even read.
    std::fs::write(w.join("data.bin"), b"limits").unwrap();
    openssl(
        &[
            "ts",
            "-query",
            "-data",
            "data.bin",
            "-sha256",
            "-out",
            "small.tsq",
        ],
        w,
    );
    let dev = tsa::alg::oid::DEVELOPMENT_POLICY.to_string();
    openssl(
        &[
            "ts",
            "-query",
            "-data",
            "data.bin",
            "-sha512",
            "-cert",
            "-tspolicy",
            &dev,
            "-out",
            "large.tsq",
        ],
        w,
    );
    let small = std::fs::read(w.join("small.tsq")).unwrap();
    let large = std::fs::read(w.join("large.tsq")).unwrap();
    assert!(
        small.len() <= max && large.len() > max,
        "{} {}",
        small.len(),
        large.len()
    );
    let mut padded = large.clone();
    padded.resize(10 * max, 0);
    std::fs::write(w.join("padded.bin"), &padded).unwrap();

    for chunked in [false, true] {
        for (file, expected) in [("small.tsq", 200), ("large.tsq", 413), ("padded.bin", 413)] {
            let path = w.join(file);
            let reply = w.join("reply.tsr");
            let mut args = vec![
                "-v".to_string(),
                "-H".into(),
                format!("Content-Type: {QUERY_TYPE}"),
                "--data-binary".into(),
                format!("@{}", path.display()),
                "-o".into(),
                reply.display().to_string(),
                "-w".into(),
                "%{http_code}".into(),
            ];
            if chunked {
                args.extend(["-H".into(), "Transfer-Encoding: chunked".into()]);
            }
            args.push(server.url.clone());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, verbose) = curl(&args);
            // What curl sent: a Content-Length, or chunks without one.
            let sent_length = verbose.lines().any(|l| l.starts_with("> Content-Length:"));
            let sent_chunked = verbose
                .lines()
                .any(|l| l.starts_with("> Transfer-Encoding: chunked"));
            assert_eq!(
                (sent_length, sent_chunked),
                (!chunked, chunked),
                "{verbose}"
            );
            assert_eq!(code, expected.to_string(), "{file}, chunked {chunked}");
            let response = Response::from_der(&std::fs::read(&reply).unwrap()).unwrap();
            if expected == 200 {
                assert!(response.granted(), "{:?}", response.status_text);
            } else {
                assert_eq!(response.status, 2);
                assert_eq!(response.fail_info(), Some(FailInfo::BadDataFormat));
                assert!(response.token.is_none());
            }
        }
    }

    // Chunks that pass the limit only together, by hand.
    let (_, path) = split_url(&server.url);
    let mut conn = Conn::open(&server.url);
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {QUERY_TYPE}\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    let chunk = vec![0x30u8; max / 2 + 1];
    for _ in 0..2 {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(&chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    conn.stream.write_all(&request).unwrap();
    let reply = conn.read_reply().unwrap();
    assert_eq!(reply.status, 413);
    assert_rejection(&reply, FailInfo::BadDataFormat);
}

#[test]
fn unknown_paths_are_404() {
    let server = Server::start(&[], "");
    let base = server.url.trim_end_matches('/');
    for (method, path) in [
        ("GET", "/nope"),
        ("POST", "/nope"),
        ("GET", "/certs/"),
        ("GET", "/health/live"),
    ] {
        let (code, _) = curl(&[
            "-X",
            method,
            "-H",
            &format!("Content-Type: {QUERY_TYPE}"),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{base}{path}"),
        ]);
        assert_eq!(code, "404", "{method} {path}");
    }
    // The admin listener does not stamp.
    let (code, _) = curl(&[
        "-H",
        &format!("Content-Type: {QUERY_TYPE}"),
        "--data-binary",
        "x",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{}/", server.admin_url),
    ]);
    assert_eq!(code, "404");
}

/// `/certs` answers HEAD as it answers GET, without the body.
#[test]
fn the_certificates_answer_head_as_get() {
    let server = Server::start(&[], "");
    let url = format!("{}/certs", server.url.trim_end_matches('/'));
    let fetch = |extra: &[&str]| {
        let (out, _) = curl(&[extra, &["-w", "\n%{http_code}", &url]].concat());
        let (text, code) = out.rsplit_once('\n').unwrap();
        (code.to_string(), text.to_string())
    };
    let (code, pem) = fetch(&[]);
    assert_eq!(code, "200");
    assert!(pem.contains("BEGIN CERTIFICATE"), "{pem}");
    let (code, headers) = fetch(&["-I"]);
    assert_eq!(code, "200", "{headers}");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("application/pem-certificate-chain"),
        "{headers}"
    );
    assert!(!headers.contains("BEGIN CERTIFICATE"), "{headers}");
}

/// The subject and SHA-256 fingerprint of a PEM certificate, as openssl reads them.
fn x509_identity(pem: &Path) -> String {
    let out = ok(Command::new("openssl").args([
        "x509",
        "-noout",
        "-subject",
        "-fingerprint",
        "-sha256",
        "-in",
        pem.to_str().unwrap(),
    ]));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn certs_returns_the_tsu_certificate_as_pem() {
    for algorithm in ["p256", "rsa2048"] {
        let server = Server::start(&["--algorithm", algorithm], "");
        let work = tempfile::tempdir().unwrap();
        let pem = work.path().join("certs.pem");
        let (content_type, _) = curl(&[
            "-o",
            pem.to_str().unwrap(),
            "-w",
            "%{http_code} %{content_type}",
            &format!("{}certs", server.url),
        ]);
        assert_eq!(content_type, "200 application/pem-certificate-chain");
        let served = std::fs::read_to_string(&pem).unwrap();
        assert!(
            served.starts_with("-----BEGIN CERTIFICATE-----"),
            "{served}"
        );
        let identity = x509_identity(&pem);
        assert_eq!(identity, x509_identity(&server.path("tsa-cert.pem")));
        assert!(identity.contains("Time-Stamping Unit"), "{identity}");
        // The served certificate is the one that verifies tokens.
        std::fs::write(work.path().join("data.bin"), b"certs").unwrap();
        openssl(
            &[
                "ts", "-query", "-data", "data.bin", "-sha256", "-out", "req.tsq",
            ],
            work.path(),
        );
        let (code, _) = curl(&[
            "-H",
            &format!("Content-Type: {QUERY_TYPE}"),
            "--data-binary",
            &format!("@{}", work.path().join("req.tsq").display()),
            "-o",
            work.path().join("reply.tsr").to_str().unwrap(),
            "-w",
            "%{http_code}",
            &server.url,
        ]);
        assert_eq!(code, "200");
        let verified = openssl(
            &[
                "ts",
                "-verify",
                "-in",
                "reply.tsr",
                "-queryfile",
                "req.tsq",
                "-CAfile",
                server.ca().to_str().unwrap(),
                "-untrusted",
                "certs.pem",
            ],
            work.path(),
        );
        assert!(String::from_utf8_lossy(&verified.stdout).contains("Verification: OK"));
    }
}

#[test]
fn admin_health_is_live_and_ready_with_the_development_clock() {
    let server = Server::start(&[], "");
    for (path, text) in [("/health/live", "live"), ("/health/ready", "ready")] {
        let (out, _) = curl(&[
            "-w",
            "\n%{http_code}",
            &format!("{}{path}", server.admin_url),
        ]);
        assert_eq!(out, format!("{text}\n\n200"), "{path}");
    }
    let (code, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{}/health/nothing", server.admin_url),
    ]);
    assert_eq!(code, "404");
}

/// DNS rebinding: a web page whose name now resolves to the admin listener's address must not
/// read it from the operator's browser. Only IP addresses, localhost and the names in
/// `server.admin_hosts` are answered.
#[test]
fn the_admin_listener_answers_only_the_host_names_it_is_known_by() {
    let server = Server::start(
        &[],
        "[server]
admin_hosts = [\"metrics.internal\"]
",
    );
    let port = server
        .admin_url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/');
    let ask = |host: &str| {
        let (out, _) = curl(&[
            "-H",
            &format!("Host: {host}"),
            "-w",
            "\n%{http_code}",
            &format!("{}/metrics", server.admin_url),
        ]);
        let (body, code) = out.rsplit_once('\n').unwrap();
        (code.to_string(), body.to_string())
    };
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("metrics.internal:{port}"),
    ] {
        let (code, body) = ask(&host);
        assert_eq!(code, "200", "{host}: {body}");
        assert!(body.contains("tsa_open_connections"), "{host}");
    }
    for host in [
        format!("attacker.example:{port}"),
        "localhost.attacker.example".into(),
    ] {
        let (code, body) = ask(&host);
        assert_eq!(code, "403", "{host}: {body}");
        assert!(!body.contains("tsa_"), "{host}: {body}");
    }
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let server = Server::start(&[], "");
    let certs = format!("{}certs", server.url);
    let (connects, _) = curl(&[
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-w",
        "%{num_connects}\n",
        &certs,
        &certs,
    ]);
    assert_eq!(connects, "1\n0\n", "curl opened a second connection");

    let (_, path) = split_url(&server.url);
    let mut conn = Conn::open(&server.url);
    let local = conn.stream.local_addr().unwrap();
    let mut serials = HashSet::new();
    for i in 0..3 {
        let query = query_for(format!("keep-alive {i}").as_bytes());
        let reply = conn.post(&path, &query.to_der().unwrap());
        assert_eq!(reply.status, 200);
        assert_ne!(
            reply.header("connection").map(str::to_ascii_lowercase),
            Some("close".into())
        );
        let response = decode(&reply);
        let tst = response.token.as_ref().expect("granted").tst_info();
        assert_eq!(
            tst.nonce.unwrap().as_bytes(),
            query.nonce.as_deref().unwrap()
        );
        assert!(serials.insert(tst.serial_number.as_bytes().to_vec()));
    }
    // All three went over the same socket.
    assert_eq!(conn.stream.local_addr().unwrap(), local);
}

/// SIGTERM: the listeners close as the drain begins, so that a new connection is refused at
/// once (and a balancer sends it elsewhere) instead of waiting in the backlog for the drain to
/// end; a request in flight still gets its answer.
#[test]
fn on_sigterm_new_connections_are_refused_and_requests_in_flight_finish() {
    let server = Server::start(&[], "");
    let (_, path) = split_url(&server.url);
    let query = query_for(b"in flight at shutdown").to_der().unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {QUERY_TYPE}\r\n\
         Content-Length: {}\r\n\r\n",
        query.len()
    );
    let mut conn = Conn::open(&server.url);
    conn.stream.write_all(head.as_bytes()).unwrap();
    conn.stream.write_all(&query[..5]).unwrap();
    // In flight once the server has accepted the connection (not only the kernel's backlog).
    let open_connections = || {
        let (metrics, _) = curl(&[&format!("{}/metrics", server.admin_url)]);
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("tsa_open_connections "))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let accepted = Instant::now();
    while open_connections() != Some(1.0) {
        assert!(
            accepted.elapsed() < Duration::from_secs(60),
            "the connection was not accepted: {:?} open",
            open_connections()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    server.signal("TERM");
    let addresses = [split_url(&server.url).0, split_url(&server.admin_url).0];
    let started = Instant::now();
    // The drain cannot end before the request in flight has its answer (the rest of its body
    // is sent below): listeners refused meanwhile were closed as the drain began. Were they
    // closed when it ends (by its own limit, closing the request's connection), the answer
    // below would not come.
    for address in &addresses {
        loop {
            let address: std::net::SocketAddr = address.parse().unwrap();
            match std::net::TcpStream::connect_timeout(&address, Duration::from_secs(1)) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
                other => assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "{address} still takes connections during the drain: {other:?}"
                ),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    conn.stream.write_all(&query[5..]).unwrap();
    let reply = conn
        .read_reply()
        .expect("the answer of the request in flight");
    assert_eq!(reply.status, 200);
    assert!(decode(&reply).granted());
}

/// Sends `head` and then `body` one octet per 100 ms until the server answers or closes;
/// returns what it said (if anything) and how long it took from the end of the head.
fn trickle(server: &Server, head: &[u8], body: &[u8]) -> (Option<Reply>, Duration) {
    let mut conn = Conn::open(&server.url);
    conn.stream.write_all(head).unwrap();
    let start = Instant::now();
    conn.stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut sent = 0;
    let mut chunk = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(10) {
        if sent < body.len() && conn.stream.write_all(&body[sent..sent + 1]).is_ok() {
            sent += 1;
        }
        match conn.stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
        if find(&conn.buf, b"\r\n\r\n").is_some() {
            break;
        }
    }
    let elapsed = start.elapsed();
    conn.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let reply = if conn.buf.is_empty() {
        None
    } else {
        conn.read_reply()
    };
    (reply, elapsed)
}

#[test]
fn slow_clients_are_cut_off_after_the_read_timeout() {
    let server = Server::start(&[], "[server]\nread_timeout_ms = 500\n");
    let timeout_ms = settings(&server)["server"]["read_timeout_ms"]
        .as_integer()
        .unwrap() as u64;
    let timeout = Duration::from_millis(timeout_ms);
    let bound = timeout * 6;
    let (_, path) = split_url(&server.url);
    let query = query_for(b"slow").to_der().unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {QUERY_TYPE}\r\n\
         Content-Length: {}\r\n\r\n",
        query.len()
    );

    // Headers, a few octets of the body, then nothing.
    let (reply, elapsed) = trickle(&server, head.as_bytes(), &query[..5]);
    assert!(
        elapsed >= timeout - Duration::from_millis(50),
        "{elapsed:?}"
    );
    assert!(elapsed < bound, "{elapsed:?}");
    if let Some(reply) = reply {
        assert_eq!(reply.status, 408);
        assert_rejection(&reply, FailInfo::BadDataFormat);
    }

    // The whole body, one octet per 100 ms: it would take longer than the timeout.
    assert!(Duration::from_millis(100) * query.len() as u32 > bound);
    let (reply, elapsed) = trickle(&server, head.as_bytes(), &query);
    assert!(
        elapsed >= timeout - Duration::from_millis(50),
        "{elapsed:?}"
    );
    assert!(elapsed < bound, "{elapsed:?}");
    if let Some(reply) = reply {
        assert_eq!(reply.status, 408);
        assert_rejection(&reply, FailInfo::BadDataFormat);
    }

    // Half the headers, then nothing: the connection is closed.
    let half = &head.as_bytes()[..head.len() / 2];
    let (reply, elapsed) = trickle(&server, half, b"");
    assert!(
        elapsed >= timeout - Duration::from_millis(50),
        "{elapsed:?}"
    );
    assert!(elapsed < bound, "{elapsed:?}");
    if let Some(reply) = reply {
        assert_eq!(reply.status, 408);
    }

    // A client at normal speed on the same server is served.
    assert_serves(&server);
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// One stamp and the client's clock around it.
struct Exchange {
    send_ns: u64,
    recv_ns: u64,
    gen_ns: u64,
    accuracy_ns: u64,
    serial: Vec<u8>,
}

/// `count` stamps on one keep-alive connection; checks the echo of each.
fn exchanges(url: &str, tag: &str, count: usize) -> Vec<Exchange> {
    let (_, path) = split_url(url);
    let mut conn = Conn::open(url);
    (0..count)
        .map(|i| {
            let data = format!("{tag} {i}");
            let query = query_for(data.as_bytes());
            let der = query.to_der().unwrap();
            let send_ns = unix_ns(SystemTime::now());
            let reply = conn.post(&path, &der);
            let recv_ns = unix_ns(SystemTime::now());
            assert_eq!(reply.status, 200);
            let response = decode(&reply);
            let token = response.token.as_ref().expect("granted");
            let tst = token.tst_info();
            assert_eq!(
                tst.message_imprint.hashed_message.as_bytes(),
                DigestAlgorithm::Sha256.digest(data.as_bytes()).unwrap()
            );
            assert_eq!(
                tst.nonce.unwrap().as_bytes(),
                query.nonce.as_deref().unwrap()
            );
            Exchange {
                send_ns,
                recv_ns,
                gen_ns: tst.gen_time.unix_ns(),
                accuracy_ns: tst.accuracy.expect("accuracy").as_ns(),
                serial: tst.serial_number.as_bytes().to_vec(),
            }
        })
        .collect()
}

/// genTime ± accuracy reaches the exchange; serials are all distinct.
fn check_exchanges(all: &[Exchange], declared_ms: u64) {
    for e in all {
        assert!(e.send_ns <= e.recv_ns);
        assert!(
            e.gen_ns.saturating_sub(e.accuracy_ns) <= e.recv_ns,
            "genTime − accuracy after the reply: gen {} acc {} recv {}",
            e.gen_ns,
            e.accuracy_ns,
            e.recv_ns
        );
        assert!(
            e.gen_ns + e.accuracy_ns >= e.send_ns,
            "genTime + accuracy before the request: gen {} acc {} send {}",
            e.gen_ns,
            e.accuracy_ns,
            e.send_ns
        );
        assert!(e.accuracy_ns >= declared_ms * 1_000_000);
    }
    let serials: HashSet<&[u8]> = all.iter().map(|e| e.serial.as_slice()).collect();
    assert_eq!(serials.len(), all.len(), "a serial number was issued twice");
}

/// genTime is strictly increasing (README), so no two tokens share one.
fn assert_distinct_gen_times(all: &[Exchange]) {
    let mut times: Vec<u64> = all.iter().map(|e| e.gen_ns).collect();
    times.sort_unstable();
    let before = times.len();
    times.dedup();
    assert_eq!(
        times.len(),
        before,
        "{} of {before} tokens share a genTime with another",
        before - times.len()
    );
}

fn declared_accuracy_ms(server: &Server) -> u64 {
    settings(server)["clock"]["development_accuracy_ms"]
        .as_integer()
        .unwrap() as u64
}

#[test]
fn gen_time_brackets_each_exchange_sequentially() {
    let server = Server::start(&[], "");
    let all = exchanges(&server.url, "sequential", 50);
    check_exchanges(&all, declared_accuracy_ms(&server));
    assert_distinct_gen_times(&all);
    // One connection, one request at a time: genTimes follow the order of the requests.
    assert!(all.windows(2).all(|w| w[0].gen_ns < w[1].gen_ns));
}

/// 8 threads × 50 stamps, each thread on its own keep-alive connection.
fn under_load(server: &Server) -> Vec<Exchange> {
    let all: Vec<Exchange> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let url = server.url.clone();
                s.spawn(move || exchanges(&url, &format!("thread {t}"), 50))
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(all.len(), 400);
    all
}

#[test]
fn gen_time_brackets_each_exchange_under_load() {
    let server = Server::start(&[], "");
    check_exchanges(&under_load(&server), declared_accuracy_ms(&server));
}

/// At microsecond precision (the default) every genTime is distinct, also when concurrent
/// requests read the clock within the same microsecond.
#[test]
fn gen_times_are_distinct_under_load() {
    let server = Server::start(&[], "");
    for _ in 0..3 {
        assert_distinct_gen_times(&under_load(&server));
    }
}

/// At millisecond precision genTime never decreases, but two tokens within one millisecond
/// share it: forcing them apart would run the stamp ahead of the clock or cap issuance at
/// 1000 tokens/s. Underneath, the clock readings still strictly increase (in microseconds),
/// and the accuracy covers the truncation.
#[test]
fn gen_times_never_decrease_at_millisecond_precision() {
    let dir = tempfile::tempdir().unwrap();
    ok(Command::new(common::TSA)
        .arg("init")
        .arg("--dir")
        .arg(dir.path()));
    let path = dir.path().join("tsa.toml");
    let mut config: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    config["token"]
        .as_table_mut()
        .unwrap()
        .insert("precision".into(), "millis".into());
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let server = Server::serve(dir);
    let all = exchanges(&server.url, "millis", 100);
    check_exchanges(&all, declared_accuracy_ms(&server));
    assert!(all.iter().all(|e| e.gen_ns % 1_000_000 == 0));
    assert!(all.windows(2).all(|w| w[0].gen_ns <= w[1].gen_ns));
}
