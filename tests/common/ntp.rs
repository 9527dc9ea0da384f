//! An NTP server on loopback whose answers a test scripts: offset from the system clock,
//! leap indicator, stratum, kiss-o'-death, silence, delay.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug)]
pub struct Behaviour {
    /// Added to the system clock in every timestamp the server sends.
    pub offset_ns: i64,
    /// NTP leap indicator: 0 none, 1 insert, 2 delete, 3 unsynchronized.
    pub leap: u8,
    pub stratum: u8,
    /// The reference ID (at stratum 2 and up, the server it takes its time from). `None`: one
    /// of this server's own, from its port, so that servers are independent of each other
    /// unless a test says otherwise.
    pub refid: Option<[u8; 4]>,
    /// Answer with a kiss-o'-death of this code.
    pub kod: Option<[u8; 4]>,
    /// Do not answer at all.
    pub silent: bool,
    /// Claim to have held each request this long (receive timestamp this much before the
    /// transmit one): more than the exchange takes makes the reply inconsistent.
    pub held_ns: i64,
    /// Before each reply, send the same datagram from another port (a stray, or a spoofing
    /// attempt that got the address but not the port).
    pub stray_first: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            offset_ns: 0,
            leap: 0,
            stratum: 2,
            refid: None,
            kod: None,
            silent: false,
            held_ns: 0,
            stray_first: false,
        }
    }
}

pub struct NtpServer {
    pub addr: SocketAddr,
    behaviour: Arc<Mutex<Behaviour>>,
    stop: Arc<AtomicBool>,
    pub requests: Arc<std::sync::atomic::AtomicUsize>,
}

impl NtpServer {
    pub fn start(behaviour: Behaviour) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let behaviour = Arc::new(Mutex::new(behaviour));
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (b, s, r) = (behaviour.clone(), stop.clone(), requests.clone());
        let [high, low] = addr.port().to_be_bytes();
        let own_refid = [198, 51, high, low];
        std::thread::spawn(move || serve(socket, b, s, r, own_refid));
        Self {
            addr,
            behaviour,
            stop,
            requests,
        }
    }

    pub fn set(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.behaviour.lock().unwrap());
    }
}

impl Drop for NtpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

const NTP_EPOCH_OFFSET: u64 = 2_208_988_800;

fn ntp_timestamp(offset_ns: i64) -> [u8; 8] {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128;
    let t = (now + offset_ns as i128) as u128;
    let secs = (t / 1_000_000_000) as u64 + NTP_EPOCH_OFFSET;
    let frac = (((t % 1_000_000_000) << 32) / 1_000_000_000) as u64;
    ((secs << 32) | frac).to_be_bytes()
}

fn serve(
    socket: UdpSocket,
    behaviour: Arc<Mutex<Behaviour>>,
    stop: Arc<AtomicBool>,
    requests: Arc<std::sync::atomic::AtomicUsize>,
    own_refid: [u8; 4],
) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::SeqCst) {
        let Ok((len, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if len < 48 {
            continue;
        }
        requests.fetch_add(1, Ordering::SeqCst);
        let b = behaviour.lock().unwrap().clone();
        if b.silent {
            continue;
        }
        let receive = ntp_timestamp(b.offset_ns - b.held_ns);
        let mut reply = [0u8; 48];
        let (stratum, refid) = match b.kod {
            Some(code) => (0, code),
            None => (b.stratum, b.refid.unwrap_or(own_refid)),
        };
        reply[0] = (b.leap << 6) | (4 << 3) | 4; // LI, version 4, mode 4 (server)
        reply[1] = stratum;
        reply[2] = 4; // poll
        reply[3] = (-20i8) as u8; // precision: about a microsecond
        reply[4..8].copy_from_slice(&0x0000_0010u32.to_be_bytes()); // root delay ≈ 0.24 ms
        reply[8..12].copy_from_slice(&0x0000_0010u32.to_be_bytes()); // root dispersion ≈ 0.24 ms
        reply[12..16].copy_from_slice(&refid);
        reply[16..24].copy_from_slice(&ntp_timestamp(b.offset_ns - 1_000_000_000));
        reply[24..32].copy_from_slice(&buf[40..48]); // origin = the client's transmit time
        reply[32..40].copy_from_slice(&receive);
        reply[40..48].copy_from_slice(&ntp_timestamp(b.offset_ns));
        if b.stray_first {
            if let Ok(other) = UdpSocket::bind("127.0.0.1:0") {
                let _ = other.send_to(&reply, peer);
            }
        }
        let _ = socket.send_to(&reply, peer);
    }
}
