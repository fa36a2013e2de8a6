//! How the pool opens the byte stream under each HTTP/2 connection.
//!
//! The pool asks a [`Connect`] implementation for one stream per connection. The default,
//! [`TcpConnector`], opens plaintext TCP (HTTP/2 prior knowledge, as gRPC over `http://` does)
//! and applies the TCP settings of the builder. TLS goes around it: with the `tls` feature,
//! `PoolBuilder::tls` wraps the connector (this one or yours) in rustls, so TLS runs over any
//! byte stream; a connector may also speak TLS itself and return the session as a [`BoxedIo`].

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::BoxFuture;

/// A byte stream the pool can run HTTP/2 over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T> Io for T where T: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

/// A boxed [`Io`], as connectors return.
pub type BoxedIo = Box<dyn Io>;

/// Where a connection goes.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Destination {
    /// The resolved address.
    pub addr: SocketAddr,
    /// The host of the target (a DNS name or an IP literal): the TLS server name.
    pub host: String,
    /// Whether the target asked for TLS (`https://`).
    pub tls: bool,
}

/// Opens the byte stream for one connection.
pub trait Connect: fmt::Debug + Send + Sync + 'static {
    /// Connects to `dst`. The pool bounds the whole attempt with its connect timeout.
    fn connect(&self, dst: &Destination) -> BoxFuture<'static, io::Result<BoxedIo>>;

    /// Whether this connector speaks TLS itself. For an `https://` target the pool puts its
    /// own TLS around a connector that does not (feature `tls`), or refuses the target
    /// (without that feature).
    fn supports_tls(&self) -> bool {
        false
    }
}

/// The default connector: plaintext TCP with the pool's TCP settings.
#[derive(Clone, Debug)]
pub struct TcpConnector {
    nodelay: bool,
    keepalive: Option<Duration>,
}

impl TcpConnector {
    /// A TCP connector with `TCP_NODELAY` set as given and TCP keepalive probes after
    /// `keepalive` of silence (off when `None`).
    pub fn new(nodelay: bool, keepalive: Option<Duration>) -> Self {
        Self { nodelay, keepalive }
    }
}

impl Default for TcpConnector {
    fn default() -> Self {
        Self::new(true, None)
    }
}

impl Connect for TcpConnector {
    fn connect(&self, dst: &Destination) -> BoxFuture<'static, io::Result<BoxedIo>> {
        let addr = dst.addr;
        let nodelay = self.nodelay;
        let keepalive = self.keepalive;
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(nodelay)?;
            if let Some(time) = keepalive {
                let ka = socket2::TcpKeepalive::new().with_time(time);
                socket2::SockRef::from(&stream).set_tcp_keepalive(&ka)?;
            }
            Ok(Box::new(stream) as BoxedIo)
        })
    }
}
