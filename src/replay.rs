//! A request body that can be sent again, for transparent retries.
//!
//! gRFC A6 lets a client retry a call transparently only when it provably never reached the
//! server's application: the stream was refused (`REFUSED_STREAM`), it was above the last
//! stream id of a GOAWAY, or it never left the client. To send it again the pool needs the
//! request body again, but hyper consumes it. So each call's body is wrapped: the original
//! lives in a shared state, every attempt reads through a cursor, and the frames read so far
//! are kept — up to [`REPLAY_BUFFER_LIMIT`] (gRPC's default per-call retry buffer, 256 KiB).
//! A call whose body outgrew the buffer is not retried; once the response headers arrive the
//! call is committed and the buffer is freed.
//!
//! The cost on the happy path is one allocation and an uncontended lock per body frame;
//! `Bytes` clones are reference counts, not copies.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;

/// The most request bytes kept per call for a transparent retry (gRPC's default).
pub(crate) const REPLAY_BUFFER_LIMIT: usize = 256 * 1024;

#[derive(Debug)]
struct State {
    original: tonic::body::Body,
    /// Data frames read from `original` so far, while replay is possible (then
    /// `frames.len() == read`); empty once it is not.
    frames: Vec<Bytes>,
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

/// The shared side: made once per call, hands out one body per attempt.
#[derive(Debug, Clone)]
pub(crate) struct Replay {
    state: Arc<Mutex<State>>,
}

impl Replay {
    pub(crate) fn new(original: tonic::body::Body) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                original,
                frames: Vec::new(),
                read: 0,
                buffered: 0,
                trailers: None,
                ended: false,
                no_replay: false,
                failed: false,
            })),
        }
    }

    /// A body for one attempt, starting from the beginning.
    pub(crate) fn body(&self) -> ReplayBody {
        ReplayBody {
            state: self.state.clone(),
            next: 0,
            done: false,
        }
    }

    /// Whether another attempt could send the same body from the start.
    pub(crate) fn can_replay(&self) -> bool {
        let state = self.state.lock();
        !state.no_replay && !state.failed
    }

    /// The response has started: no more retries, free the buffer.
    pub(crate) fn commit(&self) {
        let mut state = self.state.lock();
        state.no_replay = true;
        state.frames = Vec::new();
    }
}

/// One attempt's view of a call's request body.
#[derive(Debug)]
pub(crate) struct ReplayBody {
    state: Arc<Mutex<State>>,
    /// Index of the next buffered frame this attempt sends.
    next: usize,
    done: bool,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        let mut state = this.state.lock();
        if this.next < state.read {
            // What an earlier attempt already read: replay it, if it was kept.
            if state.no_replay {
                this.done = true;
                return Poll::Ready(Some(Err(tonic::Status::unavailable(
                    "request body already sent and not kept for a retry",
                ))));
            }
            let frame = state.frames[this.next].clone();
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        if state.ended {
            this.done = true;
            return Poll::Ready(state.trailers.clone().map(|t| Ok(Frame::trailers(t))));
        }
        match Pin::new(&mut state.original).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                state.ended = true;
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                state.failed = true;
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        state.read += 1;
                        this.next += 1;
                        if !state.no_replay {
                            if state.buffered + data.len() <= REPLAY_BUFFER_LIMIT {
                                state.buffered += data.len();
                                state.frames.push(data.clone());
                            } else {
                                state.no_replay = true;
                                state.frames = Vec::new();
                            }
                        }
                        Frame::data(data)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            state.trailers = Some(trailers.clone());
                            state.ended = true;
                            Frame::trailers(trailers)
                        }
                        Err(other) => other,
                    },
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return true;
        }
        let state = self.state.lock();
        self.next >= state.read
            && ((state.ended && state.trailers.is_none())
                || (!state.ended && state.original.is_end_stream()))
    }

    fn size_hint(&self) -> SizeHint {
        let state = self.state.lock();
        if self.next == 0 && state.read == 0 && !state.ended {
            return state.original.size_hint();
        }
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    async fn collect(mut body: ReplayBody) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            if let Ok(data) = frame.unwrap().into_data() {
                out.extend_from_slice(&data);
            }
        }
        out
    }

    #[tokio::test]
    async fn second_attempt_sends_the_same_bytes() {
        let replay = Replay::new(tonic::body::Body::new(http_body_full(b"hello world")));
        assert_eq!(collect(replay.body()).await, b"hello world");
        assert!(replay.can_replay());
        assert_eq!(collect(replay.body()).await, b"hello world");
        replay.commit();
        assert!(!replay.can_replay());
    }

    #[tokio::test]
    async fn an_attempt_cut_short_is_completed_by_the_next() {
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"cd"))),
        ];
        let body = http_body_stream(chunks);
        let replay = Replay::new(tonic::body::Body::new(body));
        // The first attempt reads one frame and is dropped.
        let mut first = replay.body();
        let frame = poll_fn(|cx| Pin::new(&mut first).poll_frame(cx)).await;
        assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "ab");
        drop(first);
        assert_eq!(collect(replay.body()).await, b"abcd");
    }

    #[tokio::test]
    async fn a_large_body_is_not_replayable() {
        let big = vec![7u8; REPLAY_BUFFER_LIMIT + 1];
        let replay = Replay::new(tonic::body::Body::new(http_body_full(&big)));
        assert_eq!(collect(replay.body()).await.len(), big.len());
        assert!(!replay.can_replay());
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
