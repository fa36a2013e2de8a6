//! The response body: h2's receive stream, with the call's in-flight mark and gRPC error codes.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::RecvStream;
use http_body::{Body, Frame};
use tokio::sync::oneshot;
use tonic::{Code, Status};

use crate::error::Error;
use crate::subchannel::InFlightGuard;

/// The body of a response from the pool.
///
/// It counts as *in flight* on its connection until it ends or is dropped (that is what
/// draining and [`Pool::close`](crate::Pool::close) wait for). Received data is handed back to
/// HTTP/2 flow control as it is read. Transport errors while reading it carry the gRPC code
/// that fits them: UNAVAILABLE when the connection is gone, the reset code's meaning when the
/// server reset the stream (`CANCEL` → CANCELLED, `ENHANCE_YOUR_CALM` → RESOURCE_EXHAUSTED, …).
#[derive(Debug)]
pub struct ResponseBody {
    inner: RecvStream,
    data_done: bool,
    guard: Option<InFlightGuard>,
    /// Stops the task still writing the request body (a bidirectional stream) when dropped.
    _request_body: Option<oneshot::Sender<()>>,
}

impl ResponseBody {
    pub(crate) fn new(
        inner: RecvStream,
        guard: InFlightGuard,
        request_body: Option<oneshot::Sender<()>>,
    ) -> Self {
        Self {
            inner,
            data_done: false,
            guard: Some(guard),
            _request_body: request_body,
        }
    }

    fn end(&mut self) {
        self.guard.take();
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
        if !this.data_done {
            match this.inner.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    // Reading it is consuming it: let the server send more.
                    let _ = this.inner.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.end();
                    return Poll::Ready(Some(Err(transport_error(e))));
                }
                Poll::Ready(None) => this.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match this.inner.poll_trailers(cx) {
            Poll::Ready(Ok(trailers)) => {
                // Trailers (or the end of the stream) end a gRPC response: the call is done.
                this.end();
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
            Poll::Ready(Err(e)) => {
                this.end();
                Poll::Ready(Some(Err(transport_error(e))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.guard.is_none() || self.inner.is_end_stream()
    }
}

/// An HTTP/2 error during a call, as the pool reports it.
pub(crate) fn transport_error(err: h2::Error) -> Error {
    Error::transport(status_from_h2(&err), err)
}

/// The gRPC status for a transport error, following gRPC's `PROTOCOL-HTTP2.md`.
///
/// A stream reset by the peer maps by its HTTP/2 code (`CANCEL` → CANCELLED, `REFUSED_STREAM`
/// → UNAVAILABLE, `ENHANCE_YOUR_CALM` → RESOURCE_EXHAUSTED, …). Everything that means *the
/// connection is gone* — I/O errors, GOAWAY, keepalive timeout, a connection closed under the
/// call — is UNAVAILABLE: the server may be fine, the call may be retried. tonic alone reports
/// most of these as UNKNOWN or INTERNAL.
pub(crate) fn status_from_h2(err: &h2::Error) -> Status {
    let message = format!("transport error: {}", crate::subchannel::error_chain(err));
    let code = if err.is_reset() {
        match err.reason() {
            Some(h2::Reason::REFUSED_STREAM) => Code::Unavailable,
            Some(h2::Reason::CANCEL) => Code::Cancelled,
            Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
            Some(h2::Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
            _ => Code::Internal,
        }
    } else {
        Code::Unavailable
    };
    Status::new(code, message)
}
