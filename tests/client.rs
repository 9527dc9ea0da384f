//! `tsa request` against a TSA that answers with somebody else's token (a replay by a man in
//! the middle, or a confused server): the reply is refused and not saved, and with `--ca` a
//! genuine answer is verified in full.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use common::{Server, TSA};

fn tsa_request(dir: &Path, url: &str, args: &[&str]) -> Output {
    Command::new(TSA)
        .current_dir(dir)
        .args(["request", "--url", url])
        .args(args)
        .env_remove("TSA_API_KEY")
        .output()
        .expect("run tsa request")
}

/// A loopback HTTP server that answers every request with `reply` as a time-stamp reply, for
/// `count` connections.
fn replaying(reply: Vec<u8>, count: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(count) {
            let mut stream = stream.unwrap();
            // The request head and its body (a small DER request): read what came.
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/timestamp-reply\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                reply.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&reply);
        }
    });
    url
}

#[test]
fn a_reply_that_answers_another_request_is_refused_and_not_saved() {
    let server = Server::start(&[], "");
    let d = server.dir.path();
    std::fs::write(d.join("first.txt"), "the first invoice").unwrap();
    std::fs::write(d.join("second.txt"), "the second invoice").unwrap();
    let ca = server.ca();
    let ca = ca.to_str().unwrap();

    // A genuine exchange, verified in full with --ca.
    let out = tsa_request(
        d,
        &server.url,
        &["--data", "first.txt", "--out", "first.tsr", "--ca", ca],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verified"), "{stdout}");
    let first = std::fs::read(d.join("first.tsr")).unwrap();

    // That reply again, for another document: refused, nothing saved.
    let url = replaying(first, 1);
    let out = tsa_request(d, &url, &["--data", "second.txt", "--out", "second.tsr"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted a replayed token: {stderr}");
    assert!(stderr.contains("does not answer"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!d.join("second.tsr").exists());
}

#[test]
fn verifying_a_token_asked_without_its_certificate_is_refused_before_asking() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("doc.txt"), "a document").unwrap();
    // Nothing listens on this port: the refusal comes before any connection.
    let out = tsa_request(
        dir.path(),
        "http://127.0.0.1:9/",
        &["--data", "doc.txt", "--no-cert", "--ca", "ca.pem"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--no-cert"), "{stderr}");
    assert!(!stderr.contains("cannot reach"), "{stderr}");
    assert!(!dir.path().join("reply.tsr").exists());
}

/// What would turn a check off or mislead is refused before anything is asked (nothing
/// listens on the URL): an empty `--ca` file (a failed download), a digest with a sign in
/// it, a broken hash; and a refused exchange leaves an earlier query file as it was.
#[test]
fn tsa_request_refuses_what_would_mislead() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("doc.txt"), "a document").unwrap();
    std::fs::write(d.join("empty.pem"), "\n").unwrap();
    let url = "http://127.0.0.1:9/";
    let refused = |args: &[&str], why: &str| {
        let out = tsa_request(d, url, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        assert!(!stderr.contains("cannot reach"), "{args:?}: {stderr}");
        assert!(!d.join("reply.tsr").exists());
    };
    refused(
        &["--data", "doc.txt", "--ca", "empty.pem"],
        "empty.pem holds no certificate",
    );
    let signed = format!("+{}", "a".repeat(63));
    refused(&["--digest", &signed], "is not hex");
    refused(&["--data", "doc.txt", "--hash", "sha1"], "broken");

    // A query file of an earlier exchange stays when the next one fails (--force).
    std::fs::write(d.join("earlier.tsq"), b"earlier").unwrap();
    let out = tsa_request(
        d,
        url,
        &["--data", "doc.txt", "--query-out", "earlier.tsq", "--force"],
    );
    assert!(!out.status.success());
    assert_eq!(std::fs::read(d.join("earlier.tsq")).unwrap(), b"earlier");
}

/// A batch run whose round trips all fail (nothing listens) gives up after three in a row
/// rather than try every chunk of a long list.
#[test]
fn a_batch_run_gives_up_after_three_failed_round_trips_in_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files: Vec<String> = (0..5)
        .map(|i| {
            let name = format!("doc-{i}.txt");
            std::fs::write(d.join(&name), format!("document {i}")).unwrap();
            name
        })
        .collect();
    let mut args = vec!["--batch", "--batch-size", "1"];
    args.extend(files.iter().map(String::as_str));
    let out = tsa_request(d, "http://127.0.0.1:9/", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert_eq!(text.matches("cannot reach").count(), 3, "{text}");
    assert!(
        text.contains("2 items not sent: 3 round trips in a row failed"),
        "{text}"
    );
    assert!(text.contains("0 of 5 granted"), "{text}");
}
