//! The response body: hyper's body, with the call's in-flight mark and gRPC error codes.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::{Code, Status};

use crate::error::Error;
use crate::subchannel::InFlightGuard;

pin_project_lite::pin_project! {
    /// The body of a response from the pool.
    ///
    /// It counts as *in flight* on its connection until it ends or is dropped (that is what
    /// draining and [`Pool::close`](crate::Pool::close) wait for). Transport errors while
    /// reading it carry the gRPC code that fits them (see [`status_from_hyper`]).
    #[derive(Debug)]
    pub struct ResponseBody {
        #[pin]
        inner: hyper::body::Incoming,
        guard: Option<InFlightGuard>,
    }
}

impl ResponseBody {
    pub(crate) fn new(inner: hyper::body::Incoming, guard: InFlightGuard) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(None) => {
                this.guard.take();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_trailers() {
                    // Trailers end a gRPC response: the call is done.
                    this.guard.take();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.guard.take();
                Poll::Ready(Some(Err(transport_error(e))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A hyper error during a call, as the pool reports it.
pub(crate) fn transport_error(err: hyper::Error) -> Error {
    Error::transport(status_from_hyper(&err), err)
}

/// The gRPC status for a transport error, following gRPC's `PROTOCOL-HTTP2.md`.
///
/// A stream reset by the peer maps by its HTTP/2 code (`CANCEL` → CANCELLED, `REFUSED_STREAM`
/// → UNAVAILABLE, `ENHANCE_YOUR_CALM` → RESOURCE_EXHAUSTED, …). Everything that means *the
/// connection is gone* — I/O errors, GOAWAY, keepalive timeout, a connection closed under the
/// call — is UNAVAILABLE: the server may be fine, the call may be retried. tonic alone reports
/// most of these as UNKNOWN or INTERNAL.
pub(crate) fn status_from_hyper(err: &hyper::Error) -> Status {
    let message = format!("transport error: {}", crate::subchannel::error_chain(err));
    let h2 = find_h2(err);
    let code = match h2 {
        Some(h2) if h2.is_reset() => match h2.reason() {
            Some(h2::Reason::REFUSED_STREAM) => Code::Unavailable,
            Some(h2::Reason::CANCEL) => Code::Cancelled,
            Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
            Some(h2::Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
            _ => Code::Internal,
        },
        _ => Code::Unavailable,
    };
    Status::new(code, message)
}

pub(crate) fn find_h2(err: &hyper::Error) -> Option<&h2::Error> {
    crate::error::sources(err).find_map(|e| e.downcast_ref::<h2::Error>())
}
