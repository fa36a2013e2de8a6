//! The response body: h2's receive stream, with the call's in-flight mark and gRPC error codes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::RecvStream;
use http_body::{Body, Frame};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tonic::{Code, Status};

use crate::conn::InFlightGuard;
use crate::error::Error;
use crate::state::Outcome;

/// The body of a response from the pool.
///
/// It counts as *in flight* on its connection until it ends or is dropped (that is what
/// draining and [`Pool::close`](crate::Pool::close) wait for). Received data is handed back to
/// HTTP/2 flow control as it is read. Transport errors while reading it carry the gRPC code
/// that fits them: UNAVAILABLE when the connection is gone, the reset code's meaning when the
/// server reset the stream (`CANCEL` → CANCELLED, `ENHANCE_YOUR_CALM` → RESOURCE_EXHAUSTED, …).
///
/// The call's deadline bounds the body too, as gRPC's deadline bounds the whole call: a
/// response still streaming when it passes ends with DEADLINE_EXCEEDED and its stream is reset.
///
/// [`ResponseBody::default()`] is an empty body that ends at once, without trailers. tonic's
/// generated `with_interceptor` constructors require `Default` of the service's response body
/// (a bound left from tonic versions whose `InterceptedService` built the response of a
/// rejected call from it; tonic 0.14 builds that one itself), so the pool must offer it.
#[derive(Debug, Default)]
pub struct ResponseBody {
    /// h2's stream; `None` in the empty default body and once the response has ended.
    inner: Option<RecvStream>,
    /// The call's deadline, if it has one, and its timer once armed.
    deadline: Deadline,
    data_frames: u8,
    data_done: bool,
    guard: Option<InFlightGuard>,
    /// The task still writing the request body (a client or bidirectional stream), if any:
    /// handed the in-flight mark when the response completes first (it stops writing and
    /// resets the stream with NO_ERROR), cancelled when dropped.
    request_body: Option<oneshot::Sender<InFlightGuard>>,
}

// Its size is a cost on every call: tonic moves a response body several times per call
// (`tonic::body::Body::new` boxes it, the response is mapped on the way up), as does the
// call's own future, and the larger the body the more of those moves become `memcpy` calls.
// With the `metrics` feature the body was 168 bytes (an in-flight guard of 104), and the
// client spent ~700 more instructions per call in `memcpy` than without the feature; at 128
// (guard 72), ~380 (callgrind of S2's client alone: `benches/RESULTS.md` section 28). Hence
// the small guard, its two-byte `Outcome` and the one-field deadline.
const _: () = assert!(std::mem::size_of::<ResponseBody>() <= 128);

/// A response body's deadline: its timer is armed only once the body waits or brings a second
/// data frame, so that a unary response (one message, then trailers, already there) never pays
/// for a timer. One field of 16 bytes rather than the instant and an optional timer (24).
#[derive(Debug, Default)]
enum Deadline {
    #[default]
    None,
    At(Instant),
    Armed(Pin<Box<Sleep>>),
}

impl ResponseBody {
    pub(crate) fn new(
        inner: RecvStream,
        guard: InFlightGuard,
        request_body: Option<oneshot::Sender<InFlightGuard>>,
        deadline: Option<Instant>,
    ) -> Self {
        Self {
            inner: Some(inner),
            deadline: deadline.map_or(Deadline::None, Deadline::At),
            data_frames: 0,
            data_done: false,
            guard: Some(guard),
            request_body,
        }
    }

    /// The next frame of the response, ending the call on its trailers or an error.
    fn poll_response(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            // The empty default body.
            return Poll::Ready(None);
        };
        if !self.data_done {
            match inner.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    // Reading it is consuming it: let the server send more.
                    let _ = inner.flow_control().release_capacity(data.len());
                    #[cfg(feature = "metrics")]
                    if let Some(guard) = &mut self.guard {
                        guard.metrics.received(&data);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Some(Err(self.fail(transport_error(e)))));
                }
                Poll::Ready(None) => self.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match inner.poll_trailers(cx) {
            Poll::Ready(Ok(trailers)) => {
                // Trailers (or the end of the stream) end a gRPC response: the call is done.
                if let (Some(guard), Some(trailers)) = (&mut self.guard, &trailers) {
                    guard.set_status_from(trailers);
                }
                self.end(true);
                // Let h2's stream go: a caller may keep an ended body (a finished `Streaming`)
                // for long, and while any stream handle lives, a connection that is closing
                // (drained, retired) cannot finish its GOAWAY and close.
                self.inner = None;
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(self.fail(transport_error(e))))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The response ended with `error`: the call's outcome.
    fn fail(&mut self, error: Error) -> Error {
        if let (Some(guard), Some(status)) = (&mut self.guard, error.status()) {
            guard.set_outcome(Outcome::Status(status.code()));
        }
        self.end(false);
        error
    }

    /// The response ended: `complete` with its trailers (or end of stream), else with an error.
    fn end(&mut self, complete: bool) {
        let mut guard = self.guard.take();
        if let (true, Some(guard)) = (complete, &mut guard) {
            if !guard.has_outcome() {
                // Ended without a gRPC status anywhere: gRPC reports that as UNKNOWN.
                guard.set_outcome(Outcome::Status(Code::Unknown));
            }
        }
        let request_body = self.request_body.take();
        if let (true, Some(guard), Some(request_body)) = (complete, guard, request_body) {
            // The server ended the call while the request was still streaming. If the request
            // body task already finished, the guard comes back and is dropped here.
            drop(request_body.send(guard));
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A response that arrived whole but was not read to its end (tonic takes the status of
        // a trailers-only response from its headers and drops the body) is complete all the
        // same: a request still streaming stops with NO_ERROR, not CANCEL.
        if self.guard.is_some() && self.inner.as_ref().is_some_and(RecvStream::is_end_stream) {
            if let Some(guard) = self.guard.as_mut().filter(|g| !g.has_outcome()) {
                // Trailers already received but never read: they hold the call's status.
                let mut cx = Context::from_waker(std::task::Waker::noop());
                if let Some(Poll::Ready(Ok(Some(trailers)))) = self
                    .inner
                    .as_mut()
                    .map(|inner| inner.poll_trailers(&mut cx))
                {
                    guard.set_status_from(&trailers);
                }
            }
            self.end(true);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        let frame = this.poll_response(cx);
        let arm = match &frame {
            Poll::Pending => true,
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                this.data_frames = this.data_frames.saturating_add(1);
                this.data_frames > 1
            }
            Poll::Ready(_) => false,
        };
        if this.guard.is_some() {
            if let (true, Deadline::At(at)) = (arm, &this.deadline) {
                this.deadline = Deadline::Armed(Box::pin(tokio::time::sleep_until(*at)));
            }
            let passed = match &mut this.deadline {
                Deadline::Armed(timer) => timer.as_mut().poll(cx).is_ready(),
                Deadline::None | Deadline::At(_) => false,
            };
            if passed {
                let error = this.fail(Error::deadline_exceeded(
                    "deadline exceeded while reading the response",
                ));
                this.deadline = Deadline::None;
                return Poll::Ready(Some(Err(error)));
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.guard.is_none() || self.inner.as_ref().is_none_or(RecvStream::is_end_stream)
    }
}

/// An HTTP/2 error during a call, as the pool reports it.
pub(crate) fn transport_error(err: h2::Error) -> Error {
    Error::transport(status_from_h2(&err), err)
}

/// The gRPC status for a transport error, following gRPC's `PROTOCOL-HTTP2.md`.
///
/// - A stream reset (by the peer, or by h2 for the peer's protocol error on it) maps by its
///   HTTP/2 code: `CANCEL` → CANCELLED, `REFUSED_STREAM` → UNAVAILABLE, `ENHANCE_YOUR_CALM` →
///   RESOURCE_EXHAUSTED, `INADEQUATE_SECURITY` → PERMISSION_DENIED, anything else INTERNAL.
/// - *The connection is gone* — I/O errors, the server's GOAWAY, a keepalive timeout, a
///   connection closed under the call — is UNAVAILABLE: the server may be fine, the call may
///   be retried. tonic alone reports most of these as UNKNOWN or INTERNAL.
/// - A protocol error found on our side is INTERNAL, not UNAVAILABLE (which invites retries
///   that would fail the same way): a request h2 refused to send (malformed), or a
///   connection h2 closed because the peer broke the protocol (a GOAWAY of our own with an
///   error code: a frame too large, a bad header block).
pub(crate) fn status_from_h2(err: &h2::Error) -> Status {
    let message = format!("transport error: {}", crate::error::error_chain(err));
    let code = if err.is_io() {
        Code::Unavailable
    } else if err.is_go_away() {
        if err.is_remote() || err.reason() == Some(h2::Reason::NO_ERROR) {
            Code::Unavailable
        } else {
            Code::Internal
        }
    } else if err.is_reset() {
        match err.reason() {
            Some(h2::Reason::REFUSED_STREAM) => Code::Unavailable,
            Some(h2::Reason::CANCEL) => Code::Cancelled,
            Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
            Some(h2::Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
            _ => Code::Internal,
        }
    } else {
        // A user error of h2's (the request could not be sent as it was) or a bare reason.
        Code::Internal
    };
    Status::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default body (what tonic's `with_interceptor` bound asks for) is empty and ends at
    /// once: no data, no trailers, no error.
    #[tokio::test]
    async fn default_body_is_empty_and_ended() {
        let mut body = ResponseBody::default();
        assert!(body.is_end_stream());
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(frame.is_none(), "no data and no trailers");
        assert!(body.is_end_stream());
    }
}
