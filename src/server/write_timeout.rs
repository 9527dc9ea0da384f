//! A connection's byte stream with a bound on how long a write may make no progress
//! (`server.write_timeout_ms`).
//!
//! hyper times the reading of a request head, and nothing else: a client that sends requests
//! and never reads the answers fills hyper's write buffer and the kernel's send buffer, after
//! which hyper neither reads nor writes and no timer runs, so the connection (and its place
//! under `max_connections`) would be held for good. Here a write, flush or shutdown that stays
//! pending for the whole timeout fails with `TimedOut`; hyper then ends the connection. Any
//! write that goes through starts the clock again, so a slow client that keeps reading is
//! never cut off by it.
//!
//! A reply that holds something scarce while it is sent (a batch's places and its tokens, up
//! to megabytes) also sets a [`SendBy`] on its connection: a write still pending then fails,
//! so a client that takes it a few octets at a time cannot hold it for hours.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// When the reply being sent must be out: set by the request that answers it, shared with
/// its connection's [`WriteTimeout`]; none while nothing is set.
#[derive(Clone, Debug, Default)]
pub struct SendBy(Arc<AtomicU64>);

/// What [`SendBy`] counts from (its nanoseconds, plus one: 0 is "none").
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl SendBy {
    pub fn set(&self, by: Instant) {
        let ns = by.saturating_duration_since(epoch()).as_nanos();
        let ns = u64::try_from(ns).unwrap_or(u64::MAX - 1) + 1;
        self.0.store(ns, Ordering::Relaxed);
    }

    pub fn clear(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub fn is_set(&self) -> bool {
        self.get().is_some()
    }

    fn get(&self) -> Option<Instant> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(epoch() + Duration::from_nanos(ns - 1)),
        }
    }
}

/// `inner`, whose writes fail once one stays pending for `timeout`, or is pending when its
/// [`SendBy`] has passed.
#[derive(Debug)]
pub struct WriteTimeout<S> {
    inner: S,
    timeout: Duration,
    send_by: SendBy,
    /// Made at the first write that has to wait, then reset for each later one.
    timer: Option<Pin<Box<Sleep>>>,
    /// While a write waits: when it has waited `timeout`.
    idle_until: Option<Instant>,
}

impl<S> WriteTimeout<S> {
    pub fn new(inner: S, timeout: Duration, send_by: SendBy) -> Self {
        Self {
            inner,
            timeout,
            send_by,
            timer: None,
            idle_until: None,
        }
    }

    /// The stream's write returned `Pending`: fail if it has waited `timeout` or the reply's
    /// send-by time has passed, else wait for the first of them too (polling the timer
    /// registers the task to be woken then).
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let now = Instant::now();
        let idle_until = *self.idle_until.get_or_insert(now + self.timeout);
        let send_by = self.send_by.get();
        if now >= idle_until {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer read nothing within write_timeout_ms",
            )));
        }
        if send_by.is_some_and(|by| by <= now) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not take the reply by its send-by time",
            )));
        }
        let deadline = send_by.map_or(idle_until, |by| by.min(idle_until));
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_ready() {
            // Due by the timer's clock, a hair before by `now` above: look again at once.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    fn after<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => self.waiting(cx),
            ready => {
                self.idle_until = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.after(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.after(polled, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn run<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
            .block_on(f)
    }

    #[test]
    fn a_write_that_stays_pending_fails_after_the_timeout() {
        run(async {
            // A pipe of 64 octets whose other end never reads.
            let (near, _far) = tokio::io::duplex(64);
            let mut stream = WriteTimeout::new(near, Duration::from_millis(100), SendBy::default());
            stream.write_all(&[0; 64]).await.expect("room for 64");
            let started = std::time::Instant::now();
            let e = stream.write_all(&[0; 1]).await.expect_err("no room left");
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(100) && took < Duration::from_secs(5),
                "{took:?}"
            );
        });
    }

    /// Reads `total` octets from `far`, 16 every 100 ms.
    async fn read_slowly(mut far: tokio::io::DuplexStream, total: usize) {
        use tokio::io::AsyncReadExt;
        let (mut got, mut chunk) = (0, [0; 16]);
        while got < total {
            tokio::time::sleep(Duration::from_millis(100)).await;
            got += far.read(&mut chunk).await.expect("read");
        }
    }

    #[test]
    fn a_slow_reader_that_keeps_reading_is_not_cut_off() {
        run(async {
            let (near, far) = tokio::io::duplex(16);
            let mut stream = WriteTimeout::new(near, Duration::from_millis(600), SendBy::default());
            // Each pause is far shorter than the timeout (room for a loaded machine's stalls),
            // all of them together longer (1.6 s).
            let writer = async move { stream.write_all(&[1; 256]).await };
            let ((), written) = tokio::join!(read_slowly(far, 256), writer);
            written.expect("every write made progress in time");
        });
    }

    #[test]
    fn a_reply_not_taken_by_its_send_by_time_fails_however_slowly_it_is_read() {
        run(async {
            use tokio::io::AsyncReadExt;
            let (near, mut far) = tokio::io::duplex(16);
            let send_by = SendBy::default();
            let mut stream = WriteTimeout::new(near, Duration::from_secs(60), send_by.clone());
            send_by.set(Instant::now() + Duration::from_millis(300));
            let reader = async move {
                let mut chunk = [0; 16];
                // Reads on (16 octets every 100 ms) until the writer gives up.
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if far.read(&mut chunk).await.map_or(true, |n| n == 0) {
                        break;
                    }
                }
            };
            let writer = async move {
                let written = stream.write_all(&[1; 4096]).await;
                drop(stream);
                written
            };
            let ((), written) = tokio::join!(reader, writer);
            let e = written.expect_err("4 KiB at 160 octets/s is not out in 300 ms");
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            assert!(e.to_string().contains("send-by"), "{e}");

            // Cleared, the same reader is only held to the timeout.
            let (near, far) = tokio::io::duplex(16);
            let send_by = SendBy::default();
            let mut stream = WriteTimeout::new(near, Duration::from_secs(60), send_by.clone());
            send_by.set(Instant::now() + Duration::from_millis(300));
            send_by.clear();
            let writer = async move { stream.write_all(&[1; 256]).await };
            let ((), written) = tokio::join!(read_slowly(far, 256), writer);
            written.expect("no send-by time");
        });
    }
}
