//! One attempt of a call on one HTTP/2 connection, on h2 directly.
//!
//! A call is sent from the caller's own task: `send_request` queues the HEADERS on the
//! connection, the request body is written to the stream, and the same future waits for the
//! response headers. There is no hop through a dispatch channel and no task per request
//! (hyper's client sends each request through a channel to its connection task and spawns a
//! task per request to await the response); the connection's driver task only does the I/O.
//!
//! The body is read one frame ahead, so that the last frame carries `END_STREAM`: a unary
//! request goes out as HEADERS + one DATA frame, not HEADERS + DATA + an empty DATA frame.
//! A body that is still being written when the response headers arrive (a bidirectional
//! stream) moves to a task of its own, which stops when the response body is dropped.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::request::Parts;
use http::{HeaderMap, Request, Response};
use tokio::sync::oneshot;

use crate::replay::{Cursor, Replay};

/// Why an attempt ended without response headers.
#[derive(Debug)]
pub(crate) enum AttemptError {
    /// h2 refused to open the stream: nothing was sent.
    Unsent(h2::Error),
    /// The stream failed after it was opened.
    Stream(h2::Error),
    /// The request body failed.
    Body(tonic::Status),
}

/// A request body still being written after the response headers arrived.
#[derive(Debug)]
pub(crate) struct Unfinished {
    pipe: Pipe,
    replay: Replay,
    cursor: Cursor,
}

impl Unfinished {
    /// Writes the rest of the body on a task of its own, until it ends, the stream ends, or
    /// `cancel` (held by the response body) is dropped.
    pub(crate) fn spawn(mut self, runtime: &tokio::runtime::Handle) -> oneshot::Sender<()> {
        let (cancel, mut cancelled) = oneshot::channel::<()>();
        runtime.spawn(async move {
            let finished = poll_fn(|cx| {
                if Pin::new(&mut cancelled).poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                self.pipe
                    .poll(&mut self.replay, &mut self.cursor, cx)
                    .map(|result| {
                        match result {
                            Ok(()) => {}
                            Err(PipeError::Stream(error)) => {
                                tracing::debug!(%error, "request stream ended after the response started");
                            }
                            Err(PipeError::Body(status)) => {
                                tracing::debug!(%status, "request body failed after the response started");
                            }
                        }
                        true
                    })
            })
            .await;
            if !finished {
                self.pipe.stream.send_reset(h2::Reason::CANCEL);
            }
        });
        cancel
    }
}

/// Sends the request `head` with the body in `replay` on `sender`'s connection and waits for
/// the response headers. The body must be replayable from the start (or not yet read).
pub(crate) async fn attempt(
    sender: &SendRequest<Bytes>,
    head: &Parts,
    replay: &mut Replay,
) -> Result<(Response<RecvStream>, Option<Pipe>, Cursor), AttemptError> {
    let mut request = Request::new(());
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.uri.clone();
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers.clone();
    let mut cursor = Cursor::default();
    let end_of_stream = replay.is_end(&cursor);
    // A fresh handle has no stream pending open, so it needs no `poll_ready`; it only checks
    // that the connection has not failed, which `send_request` checks too.
    let (mut response, stream) = sender
        .clone()
        .send_request(request, end_of_stream)
        .map_err(AttemptError::Unsent)?;
    let mut pipe = (!end_of_stream).then(|| Pipe::new(stream));
    let head = poll_fn(|cx| {
        if let Some(p) = &mut pipe {
            match p.poll(replay, &mut cursor, cx) {
                Poll::Ready(Ok(())) => pipe = None,
                Poll::Ready(Err(PipeError::Body(status))) => {
                    return Poll::Ready(Err(AttemptError::Body(status)))
                }
                // The stream failed; the response future says how.
                Poll::Ready(Err(PipeError::Stream(_))) => pipe = None,
                Poll::Pending => {}
            }
        }
        Pin::new(&mut response)
            .poll(cx)
            .map_err(AttemptError::Stream)
    })
    .await?;
    Ok((head, pipe, cursor))
}

impl Pipe {
    /// Bundles a pipe with its body, to finish it after the response headers.
    pub(crate) fn unfinished(self, replay: Replay, cursor: Cursor) -> Unfinished {
        Unfinished {
            pipe: self,
            replay,
            cursor,
        }
    }
}

#[derive(Debug)]
enum PipeError {
    Body(tonic::Status),
    Stream(h2::Error),
}

/// Writes a request body to its HTTP/2 stream, respecting flow control the way hyper does:
/// a chunk is sent once the stream has *some* send capacity, and h2 buffers the rest of it, so
/// at most one chunk per stream waits in memory.
#[derive(Debug)]
pub(crate) struct Pipe {
    stream: SendStream<Bytes>,
    /// Read from the body but not sent yet: sent once the next read shows whether it is last.
    held: Option<Bytes>,
    /// Ready to send, with its `END_STREAM` flag.
    out: Option<(Bytes, bool)>,
    trailers: Option<HeaderMap>,
}

impl Pipe {
    fn new(stream: SendStream<Bytes>) -> Self {
        Self {
            stream,
            held: None,
            out: None,
            trailers: None,
        }
    }

    fn poll(
        &mut self,
        replay: &mut Replay,
        cursor: &mut Cursor,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), PipeError>> {
        loop {
            if let Some((data, end)) = self.out.take() {
                // The last chunk goes out at once (h2 queues it until the window allows):
                // waiting for capacity would only delay a unary request.
                if !end && !data.is_empty() {
                    match self.poll_some_capacity(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            self.out = Some((data, end));
                            return Poll::Pending;
                        }
                    }
                }
                self.stream
                    .send_data(data, end)
                    .map_err(PipeError::Stream)?;
                if end {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if let Some(trailers) = self.trailers.take() {
                self.stream.reserve_capacity(0);
                self.stream
                    .send_trailers(trailers)
                    .map_err(PipeError::Stream)?;
                return Poll::Ready(Ok(()));
            }
            match replay.poll_frame(cursor, cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(previous) = self.held.replace(data) {
                            self.out = Some((previous, false));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.trailers = Some(trailers);
                            self.out = self.held.take().map(|data| (data, false));
                        }
                    }
                },
                Poll::Ready(Some(Err(status))) => {
                    self.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(Err(PipeError::Body(status)));
                }
                Poll::Ready(None) => {
                    self.out = Some((self.held.take().unwrap_or_default(), true));
                }
                Poll::Pending => match self.held.take() {
                    Some(data) => self.out = Some((data, false)),
                    None => {
                        // Wake on a reset by the peer while the body has nothing to send.
                        if let Poll::Ready(reason) = self.stream.poll_reset(cx) {
                            return Poll::Ready(Err(PipeError::Stream(match reason {
                                Ok(reason) => reason.into(),
                                Err(e) => e,
                            })));
                        }
                        return Poll::Pending;
                    }
                },
            }
        }
    }

    /// Ready once the stream may send at least one byte.
    fn poll_some_capacity(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PipeError>> {
        if self.stream.capacity() > 0 {
            return Poll::Ready(Ok(()));
        }
        self.stream.reserve_capacity(1);
        loop {
            if let Poll::Ready(reason) = self.stream.poll_reset(cx) {
                return Poll::Ready(Err(PipeError::Stream(match reason {
                    Ok(reason) => reason.into(),
                    Err(e) => e,
                })));
            }
            match ready!(self.stream.poll_capacity(cx)) {
                Some(Ok(0)) => {}
                Some(Ok(_)) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(PipeError::Stream(e))),
                None => {
                    return Poll::Ready(Err(PipeError::Stream(h2::Reason::STREAM_CLOSED.into())))
                }
            }
        }
    }
}
