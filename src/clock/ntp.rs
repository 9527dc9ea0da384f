//! The NTP adapter: polls one server with `sntpc` and turns each reply into a [`Sample`].
//!
//! sntpc already discards replies with leap indicator 3, stratum 0 or ≥ 16, a zero transmit
//! time, an origin mismatch or a kiss-o'-death. This adapter honours kiss-o'-death: `RATE`
//! doubles the poll interval (each good reply later halves it again, down to the configured
//! one), `DENY` and `RSTR` stop polling the server for an hour, then for twice as long at each
//! refusal up to a day (RFC 5905 has the client stop; asking again that seldom costs the server
//! nothing, and a refusal that was a mistake of the server's, or forged, does not take the
//! source away until the TSA restarts). Timestamps come from
//! the local clock, so offsets are UTC − local, as the discipline wants them. A reply whose
//! precision is worse than a second (2^precision s with precision > 0: no real clock, and
//! useless to a TSA that must hold 1 s), or whose sample is otherwise implausible
//! ([`Sample::is_plausible`]), counts as a missed poll.

use std::net::SocketAddr;
use std::time::Duration;

use sntpc::{KissOfDeathCode, NtpContext, NtpResult, NtpTimestampGenerator};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::discipline::{Leap, Lineage, Sample};
use super::local::LocalClock;
use super::service::SourceMessage;

/// One configured NTP server.
#[derive(Clone, Debug)]
pub struct NtpServer {
    pub addr: SocketAddr,
    pub poll: Duration,
    pub timeout: Duration,
}

/// The longest poll interval kiss-o'-death `RATE` can push a server to.
const MAX_POLL: Duration = Duration::from_secs(1024);

/// How long a server that refused us (kiss-o'-death `DENY` or `RSTR`) is left alone at first,
/// and at most.
const DENIED_PAUSE: Duration = Duration::from_secs(3_600);
const MAX_DENIED_PAUSE: Duration = Duration::from_secs(86_400);

#[derive(Clone, Copy)]
struct LocalTimestamps {
    clock: LocalClock,
    now: u64,
}

impl NtpTimestampGenerator for LocalTimestamps {
    /// Finer than a microsecond, so that sntpc reports an inconsistent reply with a round trip
    /// of 0 (it clamps a negative delay to this precision, 1 µs at its default): a server that
    /// claims to have held the request longer than the whole exchange took gives timestamps
    /// no offset fits in both directions, and [`to_sample`] refuses it instead of taking it as
    /// a sample of the narrowest delay there is. (sntpc uses this precision for nothing else
    /// here: its dispersion feature is off.)
    fn precision(&self) -> i8 {
        -30
    }

    fn init(&mut self) {
        self.now = self.clock.now();
    }
    fn timestamp_sec(&self) -> u64 {
        self.now / 1_000_000_000
    }
    fn timestamp_subsec_micros(&self) -> u32 {
        ((self.now % 1_000_000_000) / 1_000) as u32
    }
}

/// Polls `server` forever, sending samples (or misses) for source `id`.
pub async fn poll(
    id: usize,
    server: NtpServer,
    clock: LocalClock,
    tx: mpsc::Sender<SourceMessage>,
) {
    let mut interval = server.poll;
    // While the server refuses us: how long we left it alone the last time.
    let mut denied: Option<Duration> = None;
    loop {
        let message = match exchange(&server, clock).await {
            Ok(sample) => {
                interval = after_reply(interval, server.poll);
                denied = None;
                SourceMessage::Sample(id, sample)
            }
            Err(Failure::Kod(KissOfDeathCode::Rate)) => {
                interval = after_rate(interval, server.poll);
                tracing::warn!(event = "ntp_kod", server = %server.addr, code = "RATE", poll_s = interval.as_secs_f64(), "kiss-o'-death RATE: polling less often");
                SourceMessage::Missed(id)
            }
            Err(Failure::Kod(code @ (KissOfDeathCode::Deny | KissOfDeathCode::Rstr))) => {
                let pause = after_denial(denied);
                denied = Some(pause);
                tracing::error!(event = "ntp_kod", server = %server.addr, code = ?code, retry_s = pause.as_secs(), "kiss-o'-death: the server refuses us; not polled until the retry");
                if tx.send(SourceMessage::Gone(id)).await.is_err() {
                    return;
                }
                tokio::time::sleep(pause).await;
                continue;
            }
            Err(failure) => {
                tracing::debug!(server = %server.addr, %failure, "NTP poll failed");
                SourceMessage::Missed(id)
            }
        };
        if tx.send(message).await.is_err() {
            return;
        }
        tokio::time::sleep(interval).await;
    }
}

/// The poll interval after a kiss-o'-death `RATE`: doubled, up to [`MAX_POLL`] or the
/// configured interval where that is longer (a server that asks us to slow down is never
/// polled faster than configured).
fn after_rate(interval: Duration, configured: Duration) -> Duration {
    (interval * 2).min(MAX_POLL.max(configured))
}

/// How long to leave a server alone after it refused us, `last` the pause after its refusal
/// before (none: it answered since): an hour, then twice the last, up to a day.
fn after_denial(last: Option<Duration>) -> Duration {
    last.map_or(DENIED_PAUSE, |last| (last * 2).min(MAX_DENIED_PAUSE))
}

/// The poll interval after a good reply: halved, back down to the configured one (a server
/// that asked us to slow down answers again).
fn after_reply(interval: Duration, configured: Duration) -> Duration {
    (interval / 2).max(configured)
}

#[derive(Debug)]
enum Failure {
    Kod(KissOfDeathCode),
    Ntp(sntpc::Error),
    Io(std::io::Error),
    Timeout,
    Implausible,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kod(code) => write!(f, "kiss-o'-death {code:?}"),
            Self::Ntp(e) => write!(f, "invalid reply: {e:?}"),
            Self::Io(e) => write!(f, "socket error: {e}"),
            Self::Timeout => f.write_str("no reply in time"),
            Self::Implausible => {
                f.write_str("implausible reply (precision worse than 1 s, or absurd values)")
            }
        }
    }
}

async fn exchange(server: &NtpServer, clock: LocalClock) -> Result<Sample, Failure> {
    let bind: SocketAddr = if server.addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("static")
    } else {
        "[::]:0".parse().expect("static")
    };
    // A fresh socket (and source port) per poll: a late reply to an earlier poll cannot be
    // taken for this one, and off-path spoofing has to guess the port.
    let socket = UdpSocket::bind(bind).await.map_err(Failure::Io)?;
    // Connected: the kernel drops datagrams from any other address or port, which would
    // otherwise be the one sntpc reads (it reads one) and end the poll as a failure.
    socket.connect(server.addr).await.map_err(Failure::Io)?;
    let socket = sntpc_net_tokio::UdpSocketWrapper::from(socket);
    let context = NtpContext::new(LocalTimestamps { clock, now: 0 });
    let before = clock.now();
    let result = tokio::time::timeout(
        server.timeout,
        sntpc::get_time(server.addr, &socket, context),
    )
    .await
    .map_err(|_| Failure::Timeout)?;
    let after = clock.now();
    match result {
        Ok(reply) => {
            to_sample(&reply, before / 2 + after / 2, server.addr).ok_or(Failure::Implausible)
        }
        Err(sntpc::Error::KissOfDeath(code)) => Err(Failure::Kod(code)),
        Err(e) => Err(Failure::Ntp(e)),
    }
}

/// The largest precision (log2 seconds) taken from a server: 1 s.
const MAX_PRECISION: i8 = 0;

/// What this end's whole microseconds can hide: sntpc takes the local send and receive times
/// in whole microseconds (each cut by up to 1 µs: the offset and the round trip move by up to
/// 1 µs) and gives offset and round trip in whole microseconds (up to 1 µs each): up to 2 µs
/// on the offset and 1 µs on the half round trip. RFC 5905's ε counts both ends' precision;
/// this is ours.
const CLIENT_PRECISION_NS: u64 = 3_000;

/// The reply of the server at `from` as a sample; `None` when it is implausible.
fn to_sample(reply: &NtpResult, at: u64, from: SocketAddr) -> Option<Sample> {
    // A round trip of 0: inconsistent timestamps (see `LocalTimestamps::precision`).
    if reply.precision() > MAX_PRECISION || reply.roundtrip() == 0 {
        return None;
    }
    let sample = Sample {
        at,
        offset: reply.offset().checked_mul(1_000)?,
        delay: reply.roundtrip().checked_mul(1_000)?,
        root_delay: short_to_ns(reply.root_delay()),
        root_dispersion: short_to_ns(reply.root_dispersion())
            .checked_add(since_reference_ns(reply) / 1_000_000 * PHI_PPM)?,
        // The server's precision, 2^precision seconds, and ours.
        precision: (2f64.powi(i32::from(reply.precision())) * 1e9).ceil() as u64
            + CLIENT_PRECISION_NS,
        leap: match reply.leap_indicator() {
            1 => Leap::Insert,
            2 => Leap::Delete,
            _ => Leap::None,
        },
        lineage: Lineage {
            address: match from.ip().to_canonical() {
                std::net::IpAddr::V4(v4) => Some(v4.octets()),
                std::net::IpAddr::V6(_) => None,
            },
            // Stratum 1 names a reference clock, not a server.
            upstream: (2..16)
                .contains(&reply.stratum())
                .then(|| reply.reference_id()),
        },
    };
    sample.is_plausible().then_some(sample)
}

/// RFC 5905's PHI: how fast a server's dispersion grows since it last set its clock.
const PHI_PPM: u64 = 15;

/// How long before its reply the server last set its clock (its reference timestamp): the
/// root dispersion it sends is as of then, and a server that lost its own sources goes on
/// sending it. 0 where it names no reference time, or one after the reply.
fn since_reference_ns(reply: &NtpResult) -> u64 {
    const NTP_TO_UNIX_S: u64 = 2_208_988_800;
    let reference = reply.reference_timestamp();
    if reference == 0 {
        return 0;
    }
    // Both in the 32.32 format of the era they are in; the difference wraps across eras.
    let transmit =
        (reply.sec().wrapping_add(NTP_TO_UNIX_S) << 32) | u64::from(reply.sec_fraction());
    match transmit.wrapping_sub(reference) as i64 {
        ..=0 => 0,
        age => ((age as u128 * 1_000_000_000) >> 32) as u64,
    }
}

/// NTP short format (16.16 seconds) to nanoseconds.
fn short_to_ns(short: u32) -> u64 {
    (u64::from(short) * 1_000_000_000) >> 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_kiss_o_death_slows_the_polls_and_good_replies_restore_them() {
        let configured = Duration::from_secs(16);
        let mut interval = configured;
        for expected in [32, 64, 128] {
            interval = after_rate(interval, configured);
            assert_eq!(interval, Duration::from_secs(expected));
        }
        for _ in 0..20 {
            interval = after_rate(interval, configured);
        }
        assert_eq!(interval, MAX_POLL);
        for expected in [512, 256, 128, 64, 32, 16, 16] {
            interval = after_reply(interval, configured);
            assert_eq!(interval, Duration::from_secs(expected));
        }
        // Configured slower than MAX_POLL: a RATE never makes the polls faster.
        let slow = Duration::from_secs(2_048);
        assert_eq!(after_rate(slow, slow), slow);
        assert_eq!(after_rate(Duration::from_secs(1_024), slow), slow);
    }

    #[test]
    fn a_server_that_refuses_us_is_asked_again_ever_more_seldom() {
        let mut last = None;
        for hours in [1, 2, 4, 8, 16, 24, 24] {
            let pause = after_denial(last);
            assert_eq!(pause, Duration::from_secs(hours * 3_600));
            last = Some(pause);
        }
        // It answered meanwhile: an hour again at its next refusal.
        assert_eq!(after_denial(None), DENIED_PAUSE);
    }

    #[test]
    fn ntp_short_format() {
        assert_eq!(short_to_ns(0x0001_0000), 1_000_000_000);
        assert_eq!(short_to_ns(0x0000_8000), 500_000_000);
        assert_eq!(short_to_ns(0), 0);
    }

    const SERVER: SocketAddr = SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7)),
        123,
    );

    /// The sample names the server's IPv4 address, and the server it takes its time from at
    /// stratum 2 and up (its reference ID); stratum 1 names a reference clock, not a server.
    #[test]
    fn a_sample_carries_where_the_servers_time_comes_from() {
        let from = |stratum: u8, refid: [u8; 4], server: SocketAddr| {
            let reply = NtpResult::new(0, 0, 400, -20, stratum, -20, 0, 0x10, 0x20, refid, 0, 4, 0);
            to_sample(&reply, 1_795_000_000_000_000_000, server)
                .unwrap()
                .lineage
        };
        assert_eq!(
            from(2, [10, 0, 0, 1], SERVER),
            Lineage {
                address: Some([192, 0, 2, 7]),
                upstream: Some([10, 0, 0, 1]),
            }
        );
        assert_eq!(from(3, [10, 0, 0, 1], SERVER).upstream, Some([10, 0, 0, 1]));
        assert_eq!(from(1, *b"GPS\0", SERVER).upstream, None);
        let v6 = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), 123);
        assert_eq!(from(2, [10, 0, 0, 1], v6).address, None);
    }

    fn reply(precision: i8, offset_us: i64) -> NtpResult {
        reply_after(precision, offset_us, 400)
    }

    fn reply_after(precision: i8, offset_us: i64, roundtrip_us: u64) -> NtpResult {
        reply_at(precision, offset_us, roundtrip_us, 0, 0)
    }

    /// A reply sent at `transmit_unix_s` by a server whose reference timestamp is `reference`.
    fn reply_at(
        precision: i8,
        offset_us: i64,
        roundtrip_us: u64,
        transmit_unix_s: u64,
        reference: u64,
    ) -> NtpResult {
        NtpResult::new(
            transmit_unix_s,
            0,
            roundtrip_us,
            offset_us,
            2,
            precision,
            0,
            0x10,
            0x20,
            [0; 4],
            reference,
            4,
            0,
        )
    }

    #[test]
    fn the_root_dispersion_grows_since_the_servers_reference_time() {
        let at = 1_795_000_000_000_000_000;
        let sent = 1_795_000_000;
        let ntp = |unix_s: u64| (unix_s + 2_208_988_800) << 32;
        let dispersion = |reference| {
            to_sample(&reply_at(-20, 0, 400, sent, reference), at, SERVER)
                .unwrap()
                .root_dispersion
        };
        let sent_as_is = short_to_ns(0x20);
        assert_eq!(dispersion(0), sent_as_is, "no reference time: as sent");
        assert_eq!(
            dispersion(ntp(sent + 5)),
            sent_as_is,
            "a reference after the reply"
        );
        // Set 1000 s before its reply: 15 ms more.
        assert_eq!(dispersion(ntp(sent - 1_000)), sent_as_is + 15_000_000);
        // Across the 2036 era change: the reference in era 0, the reply in era 1.
        let era1 = 2_085_978_496 + 100; // Unix seconds 100 s into era 1
        let reference = (u64::from(u32::MAX) - 99) << 32; // 100 s before the era's end
        let s = to_sample(&reply_at(-20, 0, 400, era1, reference), at, SERVER).unwrap();
        assert_eq!(s.root_dispersion, sent_as_is + 200 * 15_000);
        // A reference years old makes the sample implausible.
        assert_eq!(
            to_sample(
                &reply_at(-20, 0, 400, sent, ntp(sent - 100_000_000)),
                at,
                SERVER
            ),
            None
        );
    }

    #[test]
    fn an_inconsistent_reply_is_refused() {
        let at = 1_795_000_000_000_000_000;
        assert!(to_sample(&reply_after(-20, 10, 1), at, SERVER).is_some());
        assert_eq!(to_sample(&reply_after(-20, 10, 0), at, SERVER), None);
    }

    #[test]
    fn a_precision_worse_than_a_second_is_refused() {
        let at = 1_795_000_000_000_000_000;
        let s = to_sample(&reply(-20, 1_500), at, SERVER).unwrap();
        assert_eq!(
            (s.at, s.offset, s.delay, s.precision),
            (at, 1_500_000, 400_000, 954 + CLIENT_PRECISION_NS)
        );
        assert_eq!(
            to_sample(&reply(0, 0), at, SERVER).unwrap().precision,
            1_000_000_000 + CLIENT_PRECISION_NS
        );
        for precision in [1, 33, 34, 35, 127] {
            assert_eq!(
                to_sample(&reply(precision, 0), at, SERVER),
                None,
                "{precision}"
            );
        }
        assert_eq!(to_sample(&reply(-20, i64::MAX / 100), at, SERVER), None);
    }
}
