//! A request body that can be sent again, for transparent retries.
//!
//! gRFC A6 lets a client retry a call transparently only when it provably never reached the
//! server's application: the stream was refused (`REFUSED_STREAM`), it was above the last
//! stream id of a GOAWAY, or it never left the client. To send it again the pool needs the
//! request body again, but sending consumes it. So the call keeps the body in a [`Replay`]:
//! every attempt reads through its own cursor, and the data frames read so far are kept — up to
//! [`REPLAY_BUFFER_LIMIT`] (gRPC's default per-call retry buffer, 256 KiB). A call whose body
//! outgrew the buffer is not retried; once the response headers arrive the call is committed:
//! nothing more is kept, and what the live attempt has already sent is freed — but not what
//! it has yet to send again (an attempt that follows a retry may still be replaying frames an
//! earlier one read).
//!
//! The `Replay` is owned by the call's future and lent to one attempt at a time, so the happy
//! path costs no lock and no shared allocation: one `Vec` push per data frame (a reference
//! count, not a copy of the bytes).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};

/// The most request bytes kept per call for a transparent retry (gRPC's default).
pub(crate) const REPLAY_BUFFER_LIMIT: usize = 256 * 1024;

/// A call's request body, readable again from the start while it is replayable.
#[derive(Debug)]
pub(crate) struct Replay {
    original: tonic::body::Body,
    /// Data frames read from `original`, from frame number `first_kept` on: all of them while
    /// replay is possible; after a commit, those the live attempt has yet to send.
    kept: VecDeque<Bytes>,
    first_kept: usize,
    /// How many data frames were read from `original` in all.
    read: usize,
    buffered: usize,
    trailers: Option<HeaderMap>,
    /// `original` has ended.
    ended: bool,
    /// The buffer overflowed, or the call was committed: no replay possible.
    no_replay: bool,
    /// An error from the original body (not replayable).
    failed: bool,
}

/// Where one attempt is in the body: the next frame it sends.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    next: usize,
    done: bool,
    /// The message bytes this attempt's frames carried (feature `metrics`).
    #[cfg(feature = "metrics")]
    pub(crate) sent: crate::metrics::SentBytes,
}

impl Replay {
    pub(crate) fn new(original: tonic::body::Body) -> Self {
        Self {
            original,
            kept: VecDeque::new(),
            first_kept: 0,
            read: 0,
            buffered: 0,
            trailers: None,
            ended: false,
            no_replay: false,
            failed: false,
        }
    }

    /// Whether another attempt could send the same body from the start.
    pub(crate) fn can_replay(&self) -> bool {
        !self.no_replay && !self.failed
    }

    /// The response has started on the attempt at `live`: no more retries. Frees what that
    /// attempt already sent and keeps only what it has yet to send (gRFC A6: after a commit,
    /// only what the committed attempt sent may be freed).
    pub(crate) fn commit(&mut self, live: &Cursor) {
        self.no_replay = true;
        let sent = live
            .next
            .saturating_sub(self.first_kept)
            .min(self.kept.len());
        self.kept.drain(..sent);
        self.first_kept += sent;
    }

    /// Whether an attempt at `cursor` has nothing (more) to send: not even trailers.
    pub(crate) fn is_end(&self, cursor: &Cursor) -> bool {
        cursor.done
            || (cursor.next >= self.read
                && ((self.ended && self.trailers.is_none())
                    || (!self.ended && self.original.is_end_stream())))
    }

    /// The next frame for the attempt at `cursor`.
    pub(crate) fn poll_frame(
        &mut self,
        cursor: &mut Cursor,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if cursor.done {
            return Poll::Ready(None);
        }
        if cursor.next < self.read {
            // What an earlier attempt already read: replay it, if it was kept.
            let Some(frame) = cursor
                .next
                .checked_sub(self.first_kept)
                .and_then(|i| self.kept.get(i))
                .cloned()
            else {
                cursor.done = true;
                return Poll::Ready(Some(Err(tonic::Status::unavailable(
                    "request body already sent and not kept for a retry",
                ))));
            };
            cursor.next += 1;
            #[cfg(feature = "metrics")]
            cursor.sent.feed(&frame);
            if self.no_replay && cursor.next == self.first_kept + 1 {
                // Committed: no other attempt will need it again.
                self.kept.pop_front();
                self.first_kept += 1;
            }
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        if self.ended {
            cursor.done = true;
            return Poll::Ready(self.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        }
        match Pin::new(&mut self.original).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.ended = true;
                cursor.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.failed = true;
                cursor.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        self.read += 1;
                        cursor.next += 1;
                        #[cfg(feature = "metrics")]
                        cursor.sent.feed(&data);
                        if !self.no_replay {
                            if self.buffered + data.len() <= REPLAY_BUFFER_LIMIT {
                                self.buffered += data.len();
                                self.kept.push_back(data.clone());
                            } else {
                                // Only the attempt that reads the body's new frames gets here,
                                // so it has read every kept frame: none is still to send.
                                self.no_replay = true;
                                self.first_kept = self.read;
                                self.kept = VecDeque::new();
                            }
                        }
                        Frame::data(data)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            if !self.no_replay {
                                self.trailers = Some(trailers.clone());
                            }
                            self.ended = true;
                            cursor.done = true;
                            Frame::trailers(trailers)
                        }
                        Err(other) => other,
                    },
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    async fn collect(replay: &mut Replay) -> Vec<u8> {
        let mut cursor = Cursor::default();
        let mut out = Vec::new();
        while let Some(frame) = poll_fn(|cx| replay.poll_frame(&mut cursor, cx)).await {
            if let Ok(data) = frame.unwrap().into_data() {
                out.extend_from_slice(&data);
            }
        }
        assert!(replay.is_end(&cursor));
        out
    }

    #[tokio::test]
    async fn second_attempt_sends_the_same_bytes() {
        let mut replay = Replay::new(tonic::body::Body::new(http_body_full(b"hello world")));
        assert_eq!(collect(&mut replay).await, b"hello world");
        assert!(replay.can_replay());
        assert_eq!(collect(&mut replay).await, b"hello world");
        let mut done = Cursor::default();
        (done.next, done.done) = (usize::MAX, true);
        replay.commit(&done);
        assert!(!replay.can_replay());
    }

    #[tokio::test]
    async fn an_attempt_cut_short_is_completed_by_the_next() {
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"cd"))),
        ];
        let body = http_body_stream(chunks);
        let mut replay = Replay::new(tonic::body::Body::new(body));
        // The first attempt reads one frame and is dropped.
        let mut first = Cursor::default();
        let frame = poll_fn(|cx| replay.poll_frame(&mut first, cx)).await;
        assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "ab");
        assert!(!replay.is_end(&first));
        assert_eq!(collect(&mut replay).await, b"abcd");
    }

    #[tokio::test]
    async fn a_committed_body_is_not_sent_again() {
        let mut replay = Replay::new(tonic::body::Body::new(http_body_full(b"x")));
        let mut first = Cursor::default();
        while poll_fn(|cx| replay.poll_frame(&mut first, cx))
            .await
            .is_some()
        {}
        replay.commit(&first);
        let mut again = Cursor::default();
        let frame = poll_fn(|cx| replay.poll_frame(&mut again, cx)).await;
        assert!(frame.unwrap().is_err());
    }

    /// A retry after the first attempt read part of a client stream, committed while it is
    /// still replaying what the first attempt read: the frames it has yet to re-send are kept,
    /// and the whole body goes out (it used to end "already sent and not kept").
    #[tokio::test]
    async fn a_commit_keeps_what_the_live_attempt_has_yet_to_send() {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = [b"ab", b"cd", b"ef"]
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(*c))))
            .collect();
        let mut replay = Replay::new(tonic::body::Body::new(http_body_stream(frames)));
        // The first attempt reads two frames and is refused.
        let mut first = Cursor::default();
        for _ in 0..2 {
            poll_fn(|cx| replay.poll_frame(&mut first, cx)).await;
        }
        // The retry re-sends one frame; the response starts: commit.
        let mut live = Cursor::default();
        let frame = poll_fn(|cx| replay.poll_frame(&mut live, cx)).await;
        assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "ab");
        replay.commit(&live);
        let mut rest = Vec::new();
        while let Some(frame) = poll_fn(|cx| replay.poll_frame(&mut live, cx)).await {
            rest.extend_from_slice(&frame.expect("kept, not lost").into_data().unwrap());
        }
        assert_eq!(rest, b"cdef");
        assert!(replay.kept.is_empty(), "sent frames are freed");
    }

    #[tokio::test]
    async fn a_large_body_is_not_replayable() {
        let big = vec![7u8; REPLAY_BUFFER_LIMIT + 1];
        let mut replay = Replay::new(tonic::body::Body::new(http_body_full(&big)));
        assert_eq!(collect(&mut replay).await.len(), big.len());
        assert!(!replay.can_replay());
    }

    #[tokio::test]
    async fn an_empty_body_is_at_its_end_before_any_read() {
        let replay = Replay::new(tonic::body::Body::empty());
        assert!(replay.is_end(&Cursor::default()));
    }

    fn http_body_full(bytes: &[u8]) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        http_body_stream(vec![Ok(Frame::data(Bytes::copy_from_slice(bytes)))])
    }

    /// A body from a list of frames, without pulling in http-body-util.
    fn http_body_stream(
        frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>>,
    ) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        struct Frames(std::collections::VecDeque<Result<Frame<Bytes>, std::convert::Infallible>>);
        impl Body for Frames {
            type Data = Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
                Poll::Ready(self.0.pop_front())
            }
            fn is_end_stream(&self) -> bool {
                self.0.is_empty()
            }
        }
        Frames(frames.into())
    }
}
