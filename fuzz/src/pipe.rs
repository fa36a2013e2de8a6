//! A connector that never touches the network: every connection is one end of a
//! `tokio::io::duplex`, the other end played by the harness. Each client end is counted while
//! it lives, so a harness can check that closing the pool let go of every connection.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tonic_pool::connector::{BoxedIo, Connect, Destination};
use tonic_pool::resolve::BoxFuture;

/// The pipe buffer: big enough for a burst of frames, small enough to exercise back-pressure.
pub const PIPE_CAPACITY: usize = 64 * 1024;

/// How the far end of a new connection is served: given the destination, it returns the
/// client's end (and has spawned whatever plays the server's), or an error to fail the connect.
pub type Serve = dyn Fn(&Destination) -> io::Result<DuplexStream> + Send + Sync;

/// When a closed pool must hold none of its pipes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// As soon as `close()` returns: what `Pool::close` promises ("every connection is
    /// closed"). Fails today: see `regressions/README.md`, `close_returns_before_drivers_end`.
    AtCloseReturn,
    /// Once every task that `close()` woke has run (the paused clock moves only when all
    /// tasks are idle): no pipe is leaked for good. What the fuzz targets check until the
    /// defect above is fixed, so that fuzzing goes on past it.
    AfterCloseSettles,
}

/// A [`Connect`] whose connections are in-memory pipes.
#[derive(Clone)]
pub struct PipeConnector {
    serve: Arc<Serve>,
    live: Arc<AtomicUsize>,
}

impl PipeConnector {
    /// A connector that hands each connect to `serve`.
    pub fn new(
        serve: impl Fn(&Destination) -> io::Result<DuplexStream> + Send + Sync + 'static,
    ) -> Self {
        Self {
            serve: Arc::new(serve),
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// How many client ends the pool still holds.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Panics unless the pool, just closed, holds no pipe by the time `release` says.
    pub async fn assert_released(&self, release: Release) {
        if release == Release::AfterCloseSettles {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(
            self.live(),
            0,
            "pipes still held after close() ({release:?})"
        );
    }
}

impl fmt::Debug for PipeConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipeConnector")
            .field("live", &self.live())
            .finish_non_exhaustive()
    }
}

impl Connect for PipeConnector {
    fn connect(&self, dst: &Destination) -> BoxFuture<'static, io::Result<BoxedIo>> {
        let result = (self.serve)(dst).map(|io| {
            self.live.fetch_add(1, Ordering::SeqCst);
            Box::new(Counted {
                io,
                live: self.live.clone(),
            }) as BoxedIo
        });
        Box::pin(std::future::ready(result))
    }
}

/// A client end that decrements the live count when the pool drops it.
struct Counted {
    io: DuplexStream,
    live: Arc<AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
