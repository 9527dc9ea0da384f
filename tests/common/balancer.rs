//! A real HAProxy (Debian's `haproxy`) on loopback in front of TSA instances: round robin over
//! their public listeners, each checked on its admin listener's `/health/ready`, as
//! config/examples/haproxy.cfg does it. It runs in the foreground (`-db`) with a stats socket
//! to read the servers' states, and is killed on drop. A missing haproxy fails the test with
//! what to install (scripts/test.sh installs it); nothing is skipped.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One instance behind the balancer.
pub struct Backend {
    pub name: String,
    /// `127.0.0.1:PORT` of its public listener.
    pub public: String,
    /// The port of its admin listener (on the same address).
    pub admin_port: u16,
}

pub struct Haproxy {
    dir: tempfile::TempDir,
    child: Child,
    /// `127.0.0.1:PORT` the clients talk to.
    pub addr: String,
}

pub fn haproxy_bin() -> PathBuf {
    let found = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
        .iter()
        .map(PathBuf::from)
        .chain(
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .map(|d| d.join("haproxy")),
        )
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "HAProxy is not installed: scripts/test.sh installs it (apt-get install haproxy); \
             the fleet tests do not skip"
        )
    })
}

/// A port on 127.0.0.1 that was free a moment ago, below the ephemeral range.
pub fn free_port() -> u16 {
    crate::ports::tcp::<1>()[0]
}

/// `N` distinct ports on 127.0.0.1 that were free a moment ago, below the ephemeral range.
pub fn free_ports<const N: usize>() -> [u16; N] {
    crate::ports::tcp::<N>()
}

/// The configuration: config/examples/haproxy.cfg's settings, on loopback, with short check
/// intervals so that a test sees a server go down and up within a second.
fn config(port: u16, socket: &Path, backends: &[Backend]) -> String {
    let mut servers = String::new();
    for b in backends {
        servers.push_str(&format!(
            "    server {} {} check port {}\n",
            b.name, b.public, b.admin_port
        ));
    }
    format!(
        "global
    maxconn 2000
    stats socket {socket} mode 600 level admin

defaults
    mode http
    option http-keep-alive
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 1s
    # A connection refused (an instance that just died) is tried again on another instance;
    # a request already sent is never sent twice (RFC 3161 requests are not idempotent).
    retries 2
    option redispatch

frontend tsa
    bind 127.0.0.1:{port}
    default_backend tsa

backend tsa
    balance roundrobin
    option httpchk
    http-check send meth GET uri /health/ready ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
    default-server inter 200ms fall 2 rise 2
{servers}",
        socket = socket.display()
    )
}

impl Haproxy {
    pub fn start(backends: &[Backend]) -> Haproxy {
        let bin = haproxy_bin();
        let dir = tempfile::Builder::new()
            .prefix("tsa-haproxy-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, config(port, &dir.path().join("admin.sock"), backends)).unwrap();
        let check = Command::new(&bin)
            .args(["-c", "-f"])
            .arg(&cfg)
            .output()
            .expect("run haproxy -c");
        assert!(
            check.status.success(),
            "haproxy refuses the configuration: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let child = Command::new(&bin)
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn haproxy");
        let haproxy = Haproxy {
            dir,
            child,
            addr: format!("127.0.0.1:{port}"),
        };
        // Ready once both its frontend and its stats socket accept (it binds them one after
        // the other).
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&haproxy.addr).is_err()
            || UnixStream::connect(haproxy.dir.path().join("admin.sock")).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "haproxy does not listen: {}",
                haproxy.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        haproxy
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }

    /// A command on the stats socket; its answer.
    pub fn command(&self, cmd: &str) -> String {
        let mut s = UnixStream::connect(self.dir.path().join("admin.sock"))
            .unwrap_or_else(|e| panic!("haproxy's stats socket: {e}\n{}", self.log()));
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// `show stat` as rows of (column → value) for the servers of the backend.
    fn servers(&self) -> Vec<HashMap<String, String>> {
        let csv = self.command("show stat");
        let mut lines = csv.lines();
        let header: Vec<String> = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("# ")
            .split(',')
            .map(str::to_string)
            .collect();
        lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                header
                    .iter()
                    .cloned()
                    .zip(l.split(',').map(str::to_string))
                    .collect()
            })
            .filter(|row: &HashMap<String, String>| {
                row.get("pxname").map(String::as_str) == Some("tsa")
                    && !matches!(
                        row.get("svname").map(String::as_str),
                        Some("FRONTEND" | "BACKEND")
                    )
            })
            .collect()
    }

    /// Each server's state as HAProxy sees it: "UP", "DOWN", "UP 1/2", "DOWN 1/2", …
    pub fn states(&self) -> HashMap<String, String> {
        self.servers()
            .into_iter()
            .map(|mut row| (row.remove("svname").unwrap(), row.remove("status").unwrap()))
            .collect()
    }

    /// How many responses each server gave (HTTP responses counted by HAProxy).
    pub fn responses(&self) -> HashMap<String, u64> {
        self.servers()
            .into_iter()
            .map(|row| {
                let n = ["hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx"]
                    .iter()
                    .filter_map(|c| row.get(*c)?.parse::<u64>().ok())
                    .sum();
                (row["svname"].clone(), n)
            })
            .collect()
    }

    /// Waits until `server` is in `state` (exactly, e.g. "UP" or "DOWN").
    pub fn wait_for(&self, server: &str, state: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let states = self.states();
            if states.get(server).map(String::as_str) == Some(state) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy never saw {server} {state}: {states:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
