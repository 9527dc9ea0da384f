//! GPS references for tests: a pseudo-terminal fed NMEA sentences with the current time, the
//! real gpsd reading such a terminal, and a scripted server speaking gpsd's JSON protocol for
//! faults a real gpsd cannot be made to produce.
#![allow(dead_code)]

use std::ffi::CStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};

const S: u64 = 1_000_000_000;

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A pseudo-terminal pair in raw mode: tests write to the master, a reader opens `path`.
pub struct Pty {
    pub path: PathBuf,
    master: File,
    /// Held open so that the terminal lives as long as the test, whoever opens it.
    slave: OwnedFd,
}

impl Pty {
    pub fn open() -> Pty {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two descriptors into the integers; the name, termios and
        // window size pointers may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: the buffer is valid for its length; the descriptors are open.
        unsafe {
            assert_eq!(libc::ptsname_r(master, name.as_mut_ptr(), name.len()), 0);
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(slave, &mut t), 0);
            libc::cfmakeraw(&mut t);
            assert_eq!(libc::tcsetattr(slave, libc::TCSANOW, &t), 0);
            // Writes never block the test when no one reads.
            let flags = libc::fcntl(master, libc::F_GETFL);
            libc::fcntl(master, libc::F_SETFL, flags | libc::O_NONBLOCK);
            // Not inherited by gpsd or the TSA: only the test holds the master.
            libc::fcntl(master, libc::F_SETFD, libc::FD_CLOEXEC);
            libc::fcntl(slave, libc::F_SETFD, libc::FD_CLOEXEC);
            // Readable by a daemon that dropped its privileges.
            libc::fchmod(slave, 0o666);
        }
        // SAFETY: ptsname_r wrote a NUL-terminated string.
        let path = unsafe { CStr::from_ptr(name.as_ptr()) }
            .to_str()
            .unwrap()
            .into();
        Pty {
            path,
            // SAFETY: both descriptors are open and owned by nothing else.
            master: unsafe { File::from_raw_fd(master) },
            slave: unsafe { OwnedFd::from_raw_fd(slave) },
        }
    }

    /// Discards what was written and not yet read.
    pub fn flush(&self) {
        // SAFETY: the descriptor is open.
        unsafe { libc::tcflush(self.slave.as_raw_fd(), libc::TCIFLUSH) };
    }

    pub fn write(&self, bytes: &[u8]) {
        let _ = (&self.master).write(bytes);
    }

    /// Reads and drops what the reader wrote to the terminal (gpsd's probes of the receiver),
    /// so that the reader never blocks on a full buffer.
    pub fn drain(&self) {
        let mut buf = [0u8; 4096];
        while matches!((&self.master).read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// A sentence with its checksum.
pub fn nmea(body: &str) -> String {
    let sum = body.bytes().fold(0u8, |a, b| a ^ b);
    format!("${body}*{sum:02X}\r\n")
}

/// What the receiver on the terminal says each cycle.
#[derive(Clone, Debug)]
pub struct NmeaScript {
    /// RMC status: 'A' valid, 'V' warning.
    pub status: char,
    /// GGA with fix quality 1 and 8 satellites (gpsd needs it, or GSA, for a 3D fix).
    pub gga: bool,
    /// Garmin's PGRMF, which carries the GPS leap-second count (gpsd reports `leapseconds`
    /// only after a sentence or message that carries it).
    pub pgrmf: bool,
    pub zda: bool,
    /// Also a copy of the RMC with a wrong checksum.
    pub corrupt: bool,
    pub period: Duration,
    /// Write at the start of each second (a receiver's timing; gpsd expects 1 Hz cycles).
    pub aligned: bool,
    pub silent: bool,
}

impl Default for NmeaScript {
    fn default() -> Self {
        Self {
            status: 'A',
            gga: true,
            pgrmf: false,
            zda: true,
            corrupt: false,
            period: Duration::from_secs(1),
            aligned: true,
            silent: false,
        }
    }
}

fn rmc(status: char, t: DateTime<Utc>) -> String {
    let cs = t.timestamp_subsec_millis() / 10;
    nmea(&format!(
        "GPRMC,{}.{cs:02},{status},4807.038,N,01131.000,E,000.0,000.0,{},,,A",
        t.format("%H%M%S"),
        t.format("%d%m%y")
    ))
}

/// The sentences of one cycle at UTC `t`.
pub fn sentences(script: &NmeaScript, t: DateTime<Utc>) -> String {
    let cs = t.timestamp_subsec_millis() / 10;
    let hms = format!("{}.{cs:02}", t.format("%H%M%S"));
    let dmy = t.format("%d%m%y");
    let mut out = rmc(script.status, t);
    if script.corrupt {
        // Five seconds off, and a wrong checksum: a reader that took it would be off or would
        // never trust the receiver (its time would go back).
        let bad = rmc(script.status, t + chrono::Duration::seconds(5));
        let sum = u8::from_str_radix(&bad[bad.len() - 4..bad.len() - 2], 16).unwrap();
        out.push_str(&format!("{}{:02X}\r\n", &bad[..bad.len() - 4], sum ^ 0x5a));
    }
    if script.gga {
        out.push_str(&nmea(&format!(
            "GPGGA,{hms},4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"
        )));
    }
    if script.pgrmf {
        let gps = t.timestamp() - 315_964_800 + 18;
        out.push_str(&nmea(&format!(
            "PGRMF,{},{},{dmy},{},18,4807.038,N,01131.000,E,A,2,0,0,2,1",
            gps / 604_800,
            gps % 604_800,
            t.format("%H%M%S")
        )));
    }
    if script.zda {
        out.push_str(&nmea(&format!(
            "GPZDA,{hms},{},00,00",
            t.format("%d,%m,%Y")
        )));
    }
    out
}

/// Writes the script's sentences to a terminal with the current time, until dropped.
pub struct NmeaFeed {
    pub script: Arc<Mutex<NmeaScript>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NmeaFeed {
    pub fn start(pty: Arc<Pty>, script: NmeaScript) -> NmeaFeed {
        let script = Arc::new(Mutex::new(script));
        let stop = Arc::new(AtomicBool::new(false));
        let (sc, st) = (script.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut next = unix_ns();
            while !st.load(Ordering::SeqCst) {
                pty.drain();
                let s = sc.lock().unwrap().clone();
                let now = unix_ns();
                if now < next {
                    std::thread::sleep(Duration::from_nanos((next - now).min(20_000_000)));
                    continue;
                }
                next = if s.aligned {
                    (now / S + 1) * S
                } else {
                    now + s.period.as_nanos() as u64
                };
                if !s.silent {
                    pty.write(sentences(&s, Utc::now()).as_bytes());
                }
            }
        });
        NmeaFeed {
            script,
            stop,
            thread: Some(thread),
        }
    }

    pub fn set(&self, change: impl FnOnce(&mut NmeaScript)) {
        change(&mut self.script.lock().unwrap());
    }
}

impl Drop for NmeaFeed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The real gpsd (from Debian), in the foreground, polling `device` without waiting for
/// clients, on a free loopback port (without -G it listens on loopback only).
pub struct RealGpsd {
    pub addr: SocketAddr,
    child: Child,
}

impl RealGpsd {
    pub fn start(device: &Path) -> RealGpsd {
        let [port] = crate::ports::tcp::<1>();
        let program = ["/usr/sbin/gpsd", "/usr/local/sbin/gpsd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("gpsd");
        let child = Command::new(program)
            .args(["-N", "-n", "-S", &port.to_string()])
            .arg(device)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run gpsd ({e}): run scripts/test.sh, which installs it")
            });
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let start = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "gpsd never listened on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        RealGpsd { addr, child }
    }

    /// Watches until `count` TPV reports with a 3D fix came, or for `limit`; returns the TPV
    /// reports seen. (gpsd probes the terminal for other protocols for a few seconds before it
    /// settles on NMEA.)
    pub fn tpv_reports(&self, count: usize, limit: Duration) -> Vec<serde_json::Value> {
        let stream = TcpStream::connect(self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        (&stream)
            .write_all(b"?WATCH={\"enable\":true,\"json\":true}\n")
            .unwrap();
        let mut reader = BufReader::new(stream);
        let mut tpv = Vec::new();
        let start = Instant::now();
        let mut line = String::new();
        while start.elapsed() < limit {
            match reader.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) if line.ends_with('\n') => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if v["class"] == "TPV" {
                            tpv.push(v);
                        }
                        if tpv.iter().filter(|v| v["mode"] == 3).count() >= count {
                            break;
                        }
                    }
                    line.clear();
                }
                _ => {}
            }
        }
        tpv
    }
}

impl Drop for RealGpsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the scripted gpsd reports.
#[derive(Clone, Debug)]
pub struct GpsdScript {
    /// TPV modes, one per cycle, repeated.
    pub modes: Vec<u8>,
    pub leapseconds: Option<i64>,
    /// TPV time minus the system clock.
    pub tpv_offset_ns: i64,
    /// Send a PPS report each cycle, its true time this much after the system clock's.
    pub pps_offset_ns: Option<i64>,
    /// Keep connections open but send nothing.
    pub silent: bool,
    /// Close every connection.
    pub refuse: bool,
    pub period: Duration,
}

impl Default for GpsdScript {
    fn default() -> Self {
        Self {
            modes: vec![3],
            leapseconds: Some(18),
            tpv_offset_ns: 0,
            pps_offset_ns: None,
            silent: false,
            refuse: false,
            period: Duration::from_millis(200),
        }
    }
}

/// A server speaking gpsd's JSON protocol on loopback, reporting what a test scripts.
pub struct ScriptedGpsd {
    pub addr: SocketAddr,
    pub script: Arc<Mutex<GpsdScript>>,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    /// The first line of every connection (the client's ?WATCH).
    pub watches: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

fn iso(ns: u64) -> String {
    DateTime::<Utc>::from_timestamp_nanos(ns as i64)
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

impl ScriptedGpsd {
    pub fn start(script: GpsdScript) -> ScriptedGpsd {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = ScriptedGpsd {
            addr,
            script: Arc::new(Mutex::new(script)),
            connections: Arc::new(AtomicUsize::new(0)),
            watches: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (script, connections, watches, stop) = (
            server.script.clone(),
            server.connections.clone(),
            server.watches.clone(),
            server.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        connections.fetch_add(1, Ordering::SeqCst);
                        let (script, watches, stop) =
                            (script.clone(), watches.clone(), stop.clone());
                        std::thread::spawn(move || serve(stream, script, watches, stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        server
    }

    pub fn set(&self, change: impl FnOnce(&mut GpsdScript)) {
        change(&mut self.script.lock().unwrap());
    }
}

impl Drop for ScriptedGpsd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    stream: TcpStream,
    script: Arc<Mutex<GpsdScript>>,
    watches: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut first = String::new();
    let _ = BufReader::new(&stream).read_line(&mut first);
    watches.lock().unwrap().push(first.trim_end().to_string());
    let mut out = &stream;
    let hello = "{\"class\":\"VERSION\",\"release\":\"3.22\",\"rev\":\"3.22\",\"proto_major\":3,\"proto_minor\":14}\r\n\
        {\"class\":\"DEVICES\",\"devices\":[{\"class\":\"DEVICE\",\"path\":\"/dev/ttyS0\",\"driver\":\"NMEA0183\"}]}\r\n\
        {\"class\":\"WATCH\",\"enable\":true,\"json\":true,\"pps\":true}\r\n";
    if out.write_all(hello.as_bytes()).is_err() {
        return;
    }
    let mut cycle = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let s = script.lock().unwrap().clone();
        if s.refuse {
            return;
        }
        std::thread::sleep(s.period);
        if s.silent {
            continue;
        }
        let now = unix_ns();
        let mode = s.modes[cycle % s.modes.len()];
        cycle += 1;
        let leap = s
            .leapseconds
            .map(|l| format!(",\"leapseconds\":{l}"))
            .unwrap_or_default();
        let mut msg = format!(
            "{{\"class\":\"TPV\",\"device\":\"/dev/ttyS0\",\"mode\":{mode},\"time\":\"{}\"{leap},\"ept\":0.005,\"lat\":48.1173,\"lon\":11.516666667}}\r\n",
            iso((now as i64 + s.tpv_offset_ns) as u64)
        );
        if let Some(offset) = s.pps_offset_ns {
            // The pulse was seen 5 ms ago on the system clock.
            let clock = now - 5_000_000;
            let real = (clock as i64 + offset) as u64;
            msg.push_str(&format!(
                "{{\"class\":\"PPS\",\"device\":\"/dev/ttyS0\",\"real_sec\":{},\"real_nsec\":{},\"clock_sec\":{},\"clock_nsec\":{},\"precision\":-20,\"shm\":\"NTP0\"}}\r\n",
                real / S,
                real % S,
                clock / S,
                clock % S
            ));
        }
        if out.write_all(msg.as_bytes()).is_err() {
            return;
        }
    }
}
