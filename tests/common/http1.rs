//! A plain HTTP/1.1 client over `std::net::TcpStream`, for tests that need control over the
//! bytes on the wire (keep-alive, slow clients, pipelining) or that see the server go away
//! in the middle of a request (crashes, power cuts, full disks): each exchange has a form that
//! gives the broken connection back as an error.
//!
//! Standalone (std and socket2 only), so that the archive tests' support includes it too.
#![allow(dead_code)]

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

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
    /// The value of the first header field `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive HTTP/1.1 client connection: what it has read and not yet taken stays in `buf`.
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

/// A connection to `authority` with a receive buffer as small as the kernel allows (set
/// before the handshake, so that the window it announces is small too): a client that reads
/// slowly, or not at all.
pub fn connect_with_small_receive_buffer(authority: &str) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let addr: std::net::SocketAddr = authority.parse().expect("an IP authority");
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("a socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(&addr.into()).expect("connect");
    socket.into()
}

impl Conn {
    /// A connection to `authority` (`HOST:PORT`); an error when nothing listens there.
    pub fn connect(authority: &str) -> io::Result<Conn> {
        TcpStream::connect(authority).map(Conn::over)
    }

    /// A connection to the server at `url`.
    pub fn open(url: &str) -> Conn {
        let (authority, _) = split_url(url);
        Conn::connect(&authority).expect("connect")
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
        stream.set_nodelay(true).unwrap();
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
        self.exchange("POST", path, body)
            .expect("a reply before the connection closed")
    }

    /// Sends a request (but a GET, with the time-stamp query's content type) and reads its
    /// reply; an error when the connection breaks first (closed, reset, refused). Anything
    /// else, a reply that is no HTTP or a read timeout (a server that hangs), fails the test.
    pub fn exchange(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<Reply> {
        let headers: &[(&str, &str)] = match method {
            "GET" => &[],
            _ => &[("Content-Type", QUERY_TYPE)],
        };
        let sent = self.stream.write_all(&request(method, path, headers, body));
        match sent.and_then(|()| self.next_reply()) {
            Err(e) if !broken(&e) => panic!("{method} {path}: {e}"),
            answer => answer,
        }
    }

    /// [`Conn::exchange`], as (status, body).
    pub fn request(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        let reply = self.exchange(method, path, body)?;
        Ok((reply.status, reply.body))
    }

    /// Reads one response (the TSA always sends Content-Length); `None` if the connection
    /// closes (or is reset) before a complete one. Any other failure, a read timeout
    /// included, fails the test.
    pub fn read_reply(&mut self) -> Option<Reply> {
        match self.next_reply() {
            Ok(reply) => Some(reply),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ) =>
            {
                None
            }
            Err(e) => panic!("read: {e}"),
        }
    }

    /// Reads one response; `UnexpectedEof` when the connection closes before it is whole.
    pub fn next_reply(&mut self) -> io::Result<Reply> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            self.fill()?;
        };
        let invalid = |what: String| io::Error::new(ErrorKind::InvalidData, what);
        let head = String::from_utf8(self.buf[..head_end].to_vec())
            .map_err(|_| invalid("a head that is not ASCII".into()))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| invalid(format!("no Content-Length in {head:?}")))?;
        let start = head_end + 4;
        while self.buf.len() < start + len {
            self.fill()?;
        }
        let body = self.buf[start..start + len].to_vec();
        self.buf.drain(..start + len);
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Reads more; `UnexpectedEof` at the end. A read that a stop or a freeze of the process
    /// interrupts (EINTR on a socket with a timeout, even without a signal handler) is tried
    /// again.
    pub fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Whether `e` says the connection is gone (the server closed or reset it, or is not there).
fn broken(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionRefused
    )
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
