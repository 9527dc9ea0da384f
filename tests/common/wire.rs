//! Raw HTTP/1.1 over `std::net::TcpStream`, for tests that need control over the bytes on
//! the wire (keep-alive, slow clients, pipelining), and the checks on what comes back.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tsa::alg::DigestAlgorithm;
use tsa::client::read::Response;
use tsa::client::Query;
use tsa::protocol::FailInfo;

use crate::common::Server;

pub const QUERY_TYPE: &str = "application/timestamp-query";
pub const REPLY_TYPE: &str = "application/timestamp-reply";

/// One HTTP/1.1 response as read off the wire.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A plain HTTP/1.1 client connection over `std::net::TcpStream`.
pub struct Conn {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

/// `http://HOST:PORT/PATH` → (`HOST:PORT`, `/PATH`).
pub fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").expect("an http URL");
    match rest.find('/') {
        Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    }
}

/// One HTTP/1.1 request as it goes on the wire: the headers given, then Content-Length.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut all = head.into_bytes();
    all.extend_from_slice(body);
    all
}

/// A TCP connection to `authority` from the local address `local` (any port): another
/// client address on loopback, where the whole 127.0.0.0/8 is this host's.
pub fn connect_from(authority: &str, local: &str) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let to: std::net::SocketAddr = authority.parse().expect("an IP authority");
    let from: std::net::SocketAddr = format!("{local}:0").parse().expect("an IP address");
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).expect("a socket");
    socket.bind(&from.into()).expect("bind");
    socket.connect(&to.into()).expect("connect");
    socket.into()
}

impl Conn {
    pub fn open(url: &str) -> Conn {
        let (authority, _) = split_url(url);
        Conn::over(TcpStream::connect(&authority).expect("connect"))
    }

    /// A connection to `url` from the local address `local` ([`connect_from`]).
    pub fn open_from(url: &str, local: &str) -> Conn {
        let (authority, _) = split_url(url);
        Conn::over(connect_from(&authority, local))
    }

    fn over(stream: TcpStream) -> Conn {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        self.stream
            .write_all(&request(method, path, headers, body))
            .unwrap();
    }

    pub fn post(&mut self, path: &str, body: &[u8]) -> Reply {
        self.send("POST", path, &[("Content-Type", QUERY_TYPE)], body);
        self.read_reply()
            .expect("a reply before the connection closed")
    }

    /// Reads one response (the TSA always sends Content-Length); `None` if the connection
    /// closes before a complete one.
    pub fn read_reply(&mut self) -> Option<Reply> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if !self.fill() {
                return None;
            }
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).expect("ASCII head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .expect("Content-Length");
        let start = head_end + 4;
        while self.buf.len() < start + len {
            if !self.fill() {
                return None;
            }
        }
        let body = self.buf[start..start + len].to_vec();
        self.buf.drain(..start + len);
        Some(Reply {
            status,
            headers,
            body,
        })
    }

    /// Reads more; false at EOF (or a reset). A read that a stop or a freeze of the process
    /// interrupts (EINTR on a socket with a timeout, even without a signal handler) is tried
    /// again.
    pub fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return true;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return false,
                Err(e) => panic!("read: {e}"),
            }
        }
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Where `needle` starts in `haystack`, every time.
pub fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// A fresh query for `data`, made with the crate's client (SHA-256, 64-bit nonce, certReq).
pub fn query_for(data: &[u8]) -> Query {
    Query::for_data(DigestAlgorithm::Sha256, data).unwrap()
}

pub fn decode(reply: &Reply) -> Response {
    assert_eq!(reply.header("content-type"), Some(REPLY_TYPE));
    Response::from_der(&reply.body).expect("a DER TimeStampResp")
}

pub fn assert_rejection(reply: &Reply, expected: FailInfo) {
    let response = decode(reply);
    assert_eq!(response.status, 2);
    assert_eq!(response.fail_info(), Some(expected), "{reply:?}");
    assert!(response.token.is_none());
    assert!(!response.status_text.is_empty());
}

/// A stamp path that still works: the unchanged query is granted.
pub fn assert_serves(server: &Server) {
    let (_, path) = split_url(&server.url);
    let reply = Conn::open(&server.url).post(&path, &query_for(b"control").to_der().unwrap());
    assert_eq!(reply.status, 200);
    assert!(decode(&reply).granted());
}
