#![allow(dead_code)]

//! Real `chronyd` instances serving NTP on loopback ports. `-x` keeps them off the system
//! clock; `local stratum 1` makes each serve its own clock.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Chronyd {
    pub addr: SocketAddr,
    /// Its command port (`chronyc tracking` and the like), where it has one.
    pub command: Option<SocketAddr>,
    child: Child,
    _dir: tempfile::TempDir,
}

/// A free UDP port on loopback, below the ephemeral range (released again: chronyd binds it
/// right after).
fn free_port() -> u16 {
    crate::ports::udp::<1>()[0]
}

fn is_root() -> bool {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() == 0 }
}

impl Chronyd {
    pub fn start() -> Chronyd {
        Self::with("cmdport 0\nlocal stratum 1\n", None)
    }

    /// A chronyd that follows `server` (polled 16 times a second; with `-x` it only counts the
    /// correction it would slew, "System time" in `chronyc tracking`) and answers commands on
    /// a loopback port of its own.
    pub fn following(server: SocketAddr) -> Chronyd {
        let command = free_port();
        Self::with(
            &format!(
                "cmdport {command}\nbindcmdaddress 127.0.0.1\n\
                 server {} port {} iburst minpoll -4 maxpoll -4\n",
                server.ip(),
                server.port()
            ),
            Some(format!("127.0.0.1:{command}").parse().unwrap()),
        )
    }

    fn with(extra: &str, command: Option<SocketAddr>) -> Chronyd {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("chrony.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbindaddress 127.0.0.1\n{extra}allow 127.0.0.1\n\
                 pidfile {0}/chronyd.pid\ndriftfile {0}/drift\n\
                 bindcmdaddress /\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new("chronyd");
        cmd.args(["-x", "-d", "-f"]).arg(&conf);
        if is_root() {
            cmd.args(["-u", "root"]);
        }
        // (`bindcmdaddress /`: no Unix command socket, which would replace the host
        // chronyd's, /run/chrony/chronyd.sock, and remove it on exit.)
        let log = std::fs::File::create(dir.path().join("chronyd.log")).unwrap();
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("chronyd (scripts/test.sh installs chrony)");
        // Serving once its NTP port is taken.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            let log =
                || std::fs::read_to_string(dir.path().join("chronyd.log")).unwrap_or_default();
            if let Some(status) = child.try_wait().unwrap() {
                panic!("chronyd exited ({status}): {}", log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "chronyd did not bind 127.0.0.1:{port} within 10 s: {}",
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Chronyd {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            command,
            child,
            _dir: dir,
        }
    }
}

impl Chronyd {
    /// Stops (`SIGSTOP`) or continues (`SIGCONT`) the process: stopped, it is still there and
    /// answers nothing.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory preconditions; the pid is this child's, not yet reaped.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(sent, 0, "kill({signal})");
    }
}

impl Drop for Chronyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `chronyd -Q` against `servers`: the offset chrony measures for the system clock, in
/// seconds ("System clock wrong by X seconds"; positive: the clock is behind).
pub fn chronyd_query(servers: &[SocketAddr]) -> Option<f64> {
    let mut cmd = Command::new("chronyd");
    // (`-t`: it gives up on servers that do not answer.)
    cmd.args(["-Q", "-t", "30", "-f", "/dev/null"]);
    if is_root() {
        cmd.args(["-u", "root"]);
    }
    for s in servers {
        cmd.arg(format!(
            "server {} port {} iburst minpoll -6 maxpoll -6",
            s.ip(),
            s.port()
        ));
    }
    let out = cmd.output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("System clock wrong by"))?;
    let value = line.split("wrong by ").nth(1)?.split_whitespace().next()?;
    value.parse().ok()
}
