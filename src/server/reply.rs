//! A reply's body: whole (every answer but a batch's), or a batch's, sent token by token.
//!
//! A batch of 10,000 items answers some 12 MB. Given to hyper whole, it was copied into the
//! connection's write buffer, which keeps its size for as long as the connection lives, and
//! the batch's places were returned before a single octet was sent: a client that stamped
//! batches and kept their connections open, or took their replies slowly, held that much
//! each, outside every limit. [`BatchBody`] hands hyper the `SEQUENCE OF`'s header and then
//! one `TimeStampResp` at a time, as its write buffer drains (so it holds tens of KiB), keeps
//! the batch's places until the last one is taken, and gives the connection a [`SendBy`]
//! time, after which a write still pending ends it.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, SizeHint};

use super::write_timeout::SendBy;
use crate::protocol::batch;

/// The body of every reply.
pub type ReplyBody = Either<Full<Bytes>, BatchBody>;

/// The slowest a client may take a batch's reply, once `write_timeout_ms` has passed: 1 Mbit/s.
const BATCH_MIN_RATE: u64 = 128 * 1024;

/// A batch's reply, holding `places` while it is sent.
pub struct BatchBody {
    /// The `SEQUENCE OF`'s identifier and length octets, until sent.
    header: Option<Bytes>,
    answers: std::vec::IntoIter<Vec<u8>>,
    /// Octets not yet handed to hyper.
    left: u64,
    send_by: SendBy,
    _places: Box<dyn Send + Sync>,
}

impl BatchBody {
    /// The reply of `answers` (DER `TimeStampResp`s), to be out within `write_timeout` plus
    /// its length at [`BATCH_MIN_RATE`] from now; `places` are dropped once it is, or once the
    /// connection ends.
    pub fn new(
        answers: Vec<Vec<u8>>,
        send_by: SendBy,
        write_timeout: Duration,
        places: Box<dyn Send + Sync>,
    ) -> Self {
        let content: usize = answers.iter().map(Vec::len).sum();
        let header = Bytes::from(batch::reply_header(content));
        let left = (header.len() + content) as u64;
        let allowed = write_timeout + Duration::from_secs_f64(left as f64 / BATCH_MIN_RATE as f64);
        send_by.set(tokio::time::Instant::now() + allowed);
        Self {
            header: Some(header),
            answers: answers.into_iter(),
            left,
            send_by,
            _places: places,
        }
    }
}

impl Body for BatchBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let next = match this.header.take() {
            Some(header) => Some(header),
            None => this.answers.next().map(Bytes::from),
        };
        if let Some(data) = &next {
            this.left -= data.len() as u64;
        }
        Poll::Ready(next.map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

impl Drop for BatchBody {
    fn drop(&mut self) {
        self.send_by.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Place(Arc<AtomicUsize>);
    impl Drop for Place {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_batch_body_is_the_encoded_batch_and_holds_its_places_until_sent() {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
            .block_on(async {
                let answers = vec![vec![0x30, 0x01, 0x07], vec![0x30, 0x00], vec![0x30; 300]];
                let whole = batch::encode(&answers);
                let held = Arc::new(AtomicUsize::new(1));
                let send_by = SendBy::default();
                let mut body = BatchBody::new(
                    answers,
                    send_by.clone(),
                    Duration::from_secs(5),
                    Box::new(Place(held.clone())),
                );
                assert_eq!(body.size_hint().exact(), Some(whole.len() as u64));
                assert!(send_by.is_set());
                let mut sent = Vec::new();
                while let Some(frame) = body.frame().await {
                    sent.extend_from_slice(&frame.unwrap().into_data().unwrap());
                    assert_eq!(held.load(Ordering::SeqCst), 1, "held while sent");
                }
                assert!(body.is_end_stream());
                assert_eq!(sent, whole);
                drop(body);
                assert_eq!(held.load(Ordering::SeqCst), 0, "returned once sent");
                assert!(!send_by.is_set());
            });
    }
}
