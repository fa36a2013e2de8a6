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

use crate::call::replay::{Cursor, Replay};

/// Why an attempt ended without response headers.
#[derive(Debug)]
pub(crate) enum AttemptError {
    /// h2 refused to open the stream: nothing was sent.
    Unsent(h2::Error),
    /// The stream (its id given) failed after it was opened.
    Stream(h2::Error, u32),
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
    /// Writes the rest of the body on a task of its own, until it ends or the returned
    /// sender speaks for the response:
    ///
    /// - a value sent means the response is complete (the server ended the stream before the
    ///   request did): stop writing and reset the stream with `NO_ERROR`, as gRPC's HTTP/2
    ///   protocol asks; the value (the call's in-flight mark) is dropped only then, so the
    ///   call counts until its stream is really done;
    /// - the sender dropped means the response was abandoned: reset with `CANCEL`.
    pub(crate) fn spawn<T: Send + 'static>(
        mut self,
        runtime: &tokio::runtime::Handle,
    ) -> oneshot::Sender<T> {
        let (done, mut response_done) = oneshot::channel::<T>();
        runtime.spawn(async move {
            let stopped = poll_fn(|cx| {
                if let Poll::Ready(complete) = Pin::new(&mut response_done).poll(cx) {
                    return Poll::Ready(Some(complete.ok()));
                }
                self.pipe
                    .poll(&mut self.replay, &mut self.cursor, cx)
                    .map(|result| {
                        match result {
                            Ok(()) => {}
                            Err(PipeError::Stream(error)) => {
                                tracing::trace!(%error, "request stream ended after the response started");
                            }
                            Err(PipeError::Body(status)) => {
                                tracing::trace!(%status, "request body failed after the response started");
                            }
                        }
                        None
                    })
            })
            .await;
            match stopped {
                // The body ended by itself (or failed and reset the stream).
                None => {}
                Some(Some(in_flight)) => {
                    self.pipe.stream.send_reset(h2::Reason::NO_ERROR);
                    drop(in_flight);
                }
                Some(None) => self.pipe.stream.send_reset(h2::Reason::CANCEL),
            }
        });
        done
    }
}

/// Sends the request `head` with the body in `replay` on `sender`'s connection and waits for
/// the response headers. The body must be replayable from the start (or not yet read).
pub(crate) async fn attempt(
    mut sender: SendRequest<Bytes>,
    head: &Parts,
    replay: &mut Replay,
    cursor: &mut Cursor,
) -> Result<(Response<RecvStream>, Option<Pipe>), AttemptError> {
    let mut request = Request::new(());
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.uri.clone();
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers.clone();
    let end_of_stream = replay.is_end(cursor);
    // A fresh handle has no stream pending open, so it needs no `poll_ready`; it only checks
    // that the connection has not failed, which `send_request` checks too.
    let (mut response, stream) = sender
        .send_request(request, end_of_stream)
        .map_err(AttemptError::Unsent)?;
    let mut pipe = (!end_of_stream).then(|| Pipe::new(stream));
    let head = poll_fn(|cx| {
        if let Some(p) = &mut pipe {
            match p.poll(replay, cursor, cx) {
                Poll::Ready(Ok(())) => pipe = None,
                Poll::Ready(Err(PipeError::Body(status))) => {
                    return Poll::Ready(Err(AttemptError::Body(status)))
                }
                // The stream failed; the response future says how.
                Poll::Ready(Err(PipeError::Stream(_))) => pipe = None,
                Poll::Pending => {}
            }
        }
        match Pin::new(&mut response).poll(cx) {
            Poll::Ready(Err(error)) => {
                // Only on failure: reading the id takes h2's stream-store lock.
                let id = u32::from(response.stream_id());
                Poll::Ready(Err(AttemptError::Stream(error, id)))
            }
            Poll::Ready(Ok(head)) => Poll::Ready(Ok(head)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await?;
    Ok((head, pipe))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_io::{client_frames, Recorder};

    /// A body like tonic's encoder: it does not know it has ended until polled once more.
    struct Chunks(std::collections::VecDeque<&'static [u8]>);

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = tonic::Status;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c)))),
            )
        }
    }

    /// (type, flags, payload length) of each frame on stream 1, after the client preface.
    fn frames_of_stream_1(bytes: &[u8]) -> Vec<(u8, u8, usize)> {
        client_frames(bytes)
            .into_iter()
            .filter(|f| f.stream == 1)
            .map(|f| (f.kind, f.flags, f.len))
            .collect()
    }

    async fn sent_frames(chunks: &[&'static [u8]]) -> Vec<(u8, u8, usize)> {
        sent_frames_of(tonic::body::Body::new(Chunks(
            chunks.iter().copied().collect(),
        )))
        .await
    }

    /// The frames the pool's exchange writes for one call with `body`, to a real h2 server.
    async fn sent_frames_of(body: tonic::body::Body) -> Vec<(u8, u8, usize)> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            // Accepting drives the connection; each request is answered on a task of its own
            // once its body has ended. Serves until the client goes away.
            while let Some(accepted) = conn.accept().await {
                let (request, mut respond) = accepted.unwrap();
                tokio::spawn(async move {
                    let mut body = request.into_body();
                    while let Some(data) = body.data().await {
                        let data = data.unwrap();
                        body.flow_control().release_capacity(data.len()).unwrap();
                    }
                    let mut stream = respond.send_response(Response::new(()), false).unwrap();
                    stream.send_trailers(HeaderMap::new()).unwrap();
                });
            }
        });
        let (recorder, written) = Recorder::new(client_io);
        let (send, conn) = h2::client::handshake(recorder).await.unwrap();
        let driver = tokio::spawn(conn);
        let head = Request::post("http://test/echo.Echo/Unary")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let mut replay = Replay::new(body);
        let mut cursor = Cursor::default();
        let attempted = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            attempt(send.clone(), &head, &mut replay, &mut cursor),
        )
        .await;
        let Ok(attempted) = attempted else {
            panic!(
                "no response; frames sent: {:?}",
                frames_of_stream_1(&written.lock().unwrap())
            );
        };
        let (response, unfinished) = attempted.unwrap();
        assert!(
            unfinished.is_none(),
            "the whole body went out before the response"
        );
        let mut body = response.into_body();
        assert!(body.trailers().await.unwrap().is_some());
        drop((send, body));
        driver.await.unwrap().unwrap();
        server.await.unwrap();
        let bytes = written.lock().unwrap().clone();
        frames_of_stream_1(&bytes)
    }

    const HEADERS: u8 = 0x1;
    const DATA: u8 = 0x0;
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;

    /// A unary request is HEADERS + one DATA frame carrying END_STREAM — not hyper's HEADERS +
    /// DATA + an empty DATA frame to end the stream.
    #[tokio::test]
    async fn a_unary_request_is_headers_and_one_final_data_frame() {
        let frames = sent_frames(&[b"hello"]).await;
        assert_eq!(
            frames,
            vec![(HEADERS, END_HEADERS, frames[0].2), (DATA, END_STREAM, 5)]
        );
    }

    /// Several chunks go out as they are, the last one ending the stream.
    #[tokio::test]
    async fn chunks_go_out_in_order_and_the_last_ends_the_stream() {
        let frames = sent_frames(&[b"ab", b"cde", b"f"]).await;
        assert_eq!(
            frames[1..],
            [(DATA, 0, 2), (DATA, 0, 3), (DATA, END_STREAM, 1)]
        );
    }

    /// A body known to be empty ends the stream on the HEADERS frame itself.
    #[tokio::test]
    async fn an_empty_body_ends_the_stream_with_the_headers() {
        let frames = sent_frames_of(tonic::body::Body::empty()).await;
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0].0, HEADERS);
        assert_eq!(frames[0].1, END_HEADERS | END_STREAM);
    }
}
