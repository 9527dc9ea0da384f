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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `inner`, whose writes fail once one stays pending for `timeout`.
#[derive(Debug)]
pub struct WriteTimeout<S> {
    inner: S,
    timeout: Duration,
    /// Made at the first write that has to wait, then reset for each later one.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer runs for the write pending now.
    armed: bool,
}

impl<S> WriteTimeout<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            timer: None,
            armed: false,
        }
    }

    /// The stream's write returned `Pending`: start the clock if it does not run, and fail
    /// once it ran out. Polling the timer registers the task to be woken when it does.
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let deadline = Instant::now() + self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer read nothing within write_timeout_ms",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn after<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => self.waiting(cx),
            ready => {
                self.armed = false;
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
            let mut stream = WriteTimeout::new(near, Duration::from_millis(100));
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

    #[test]
    fn a_slow_reader_that_keeps_reading_is_not_cut_off() {
        run(async {
            use tokio::io::AsyncReadExt;
            let (near, mut far) = tokio::io::duplex(16);
            let mut stream = WriteTimeout::new(near, Duration::from_millis(600));
            let reader = async move {
                let mut got = 0;
                let mut chunk = [0; 16];
                while got < 256 {
                    // Each pause is far shorter than the timeout (room for a loaded machine's
                    // stalls), all of them together longer (1.6 s).
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    got += far.read(&mut chunk).await.expect("read");
                }
            };
            let writer = async move { stream.write_all(&[1; 256]).await };
            let ((), written) = tokio::join!(reader, writer);
            written.expect("every write made progress in time");
        });
    }
}
