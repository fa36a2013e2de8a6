//! How the pool opens the byte stream under each HTTP/2 connection.
//!
//! The pool asks a [`Connect`] implementation for one stream per connection. The default,
//! [`TcpConnector`], opens plaintext TCP (HTTP/2 prior knowledge, as gRPC over `http://` does).
//! TLS goes around it: with the `tls` feature, `PoolBuilder::tls` wraps the connector (this
//! one or yours) in rustls, so TLS runs over any byte stream; a connector may also speak TLS
//! itself and return the session as a [`BoxedIo`].
//!
//! # TCP settings reach every connector
//!
//! The builder's TCP settings (`tcp_nodelay`, `tcp_keepalive`, `tcp_keepalive_interval`,
//! `tcp_keepalive_retries`, `local_address`) are not the default connector's own: they travel
//! with each connection, in [`Destination::tcp`]. A connector that opens TCP itself opens it
//! with [`TcpSettings::connect`] (or applies them to a stream it opened with
//! [`TcpSettings::apply`]), so that a custom connector — a TLS wrapper, a proxy dialer —
//! keeps them instead of silently losing them. [`TcpConnector`] does exactly that and nothing
//! more, so a wrapping connector can call it as its inner connector.
//!
//! # Unix domain sockets
//!
//! A `unix:` or `unix-abstract:` target's endpoint is an [`EndpointAddr::Unix`] or
//! [`EndpointAddr::UnixAbstract`] in [`Destination::addr`]; [`TcpConnector`] (the default)
//! opens those with [`connect_unix`], and the TCP settings do not apply to them. TLS, when
//! configured, wraps the Unix stream as it wraps TCP (verifying `localhost`, the host of a
//! Unix target, unless a server name is set). A connector of your own that only knows TCP
//! takes the socket address with [`EndpointAddr::socket_addr`]:
//!
//! ```
//! use std::io;
//! use tonic_pool::connector::{BoxedIo, Connect, Destination};
//! use tonic_pool::BoxFuture;
//!
//! /// Opens TCP with the pool's settings, then would wrap the stream (TLS, a proxy protocol…).
//! #[derive(Debug)]
//! struct Wrapping;
//!
//! impl Connect for Wrapping {
//!     fn connect(&self, dst: &Destination) -> BoxFuture<'static, io::Result<BoxedIo>> {
//!         let (tcp, addr) = (dst.tcp.clone(), dst.addr.clone());
//!         Box::pin(async move {
//!             let Some(addr) = addr.socket_addr() else {
//!                 // A `unix:` target: no TCP settings apply.
//!                 let stream = tonic_pool::connector::connect_unix(&addr).await?;
//!                 return Ok(Box::new(stream) as BoxedIo);
//!             };
//!             let stream = tcp.connect(addr).await?; // nodelay, keepalive, local address
//!             Ok(Box::new(stream) as BoxedIo)
//!         })
//!     }
//! }
//! ```

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
#[cfg(unix)]
use tokio::net::UnixStream;
use tokio::net::{TcpSocket, TcpStream};

use crate::addr::EndpointAddr;
use crate::BoxFuture;

/// A byte stream the pool can run HTTP/2 over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T> Io for T where T: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

/// A boxed [`Io`], as connectors return.
pub type BoxedIo = Box<dyn Io>;

/// Where a connection goes, and how its TCP socket should be set up.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Destination {
    /// The resolved address.
    pub addr: EndpointAddr,
    /// The host of the target (a DNS name or an IP literal; `localhost` for a Unix socket):
    /// the TLS server name.
    pub host: String,
    /// Whether the target asked for TLS (`https://`).
    pub tls: bool,
    /// The pool's TCP settings; a connector that opens TCP applies them (see the
    /// [module docs](self)).
    pub tcp: TcpSettings,
}

impl Destination {
    /// A destination with the default TCP settings (for a connector's own tests; the pool
    /// makes its destinations itself).
    pub fn new(addr: impl Into<EndpointAddr>, host: impl Into<String>, tls: bool) -> Self {
        Self {
            addr: addr.into(),
            host: host.into(),
            tls,
            tcp: TcpSettings::default(),
        }
    }
}

/// The TCP settings of every connection of a pool, set on the builder and handed to the
/// connector in [`Destination::tcp`].
///
/// TCP keepalive is on when any of `keepalive_time`, `keepalive_interval` or
/// `keepalive_retries` is set; the ones left `None` keep the operating system's values.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TcpSettings {
    /// `TCP_NODELAY` (builder: `tcp_nodelay`). Default `true`.
    pub nodelay: bool,
    /// Idle time before the first keepalive probe (`TCP_KEEPIDLE`; builder: `tcp_keepalive`).
    pub keepalive_time: Option<Duration>,
    /// Time between unanswered keepalive probes (`TCP_KEEPINTVL`; builder:
    /// `tcp_keepalive_interval`).
    pub keepalive_interval: Option<Duration>,
    /// Unanswered probes before the connection is dropped (`TCP_KEEPCNT`; builder:
    /// `tcp_keepalive_retries`).
    pub keepalive_retries: Option<u32>,
    /// The local address to bind before connecting (builder: `local_address`). An address
    /// of the other IP family than the destination's is ignored for that destination.
    pub local_address: Option<IpAddr>,
}

impl Default for TcpSettings {
    fn default() -> Self {
        Self {
            nodelay: true,
            keepalive_time: None,
            keepalive_interval: None,
            keepalive_retries: None,
            local_address: None,
        }
    }
}

impl TcpSettings {
    /// Opens a TCP connection to `addr` with these settings: binds the local address first
    /// (if any), connects, then sets `TCP_NODELAY` and keepalive.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(local) = self.local_address {
            if local.is_ipv4() == addr.is_ipv4() {
                socket.bind(SocketAddr::new(local, 0))?;
            }
        }
        let stream = socket.connect(addr).await?;
        self.apply(&stream)?;
        Ok(stream)
    }

    /// Sets `TCP_NODELAY` and keepalive on a stream opened some other way (the local address
    /// can only be chosen before connecting: see [`connect`](Self::connect)).
    pub fn apply(&self, stream: &TcpStream) -> io::Result<()> {
        stream.set_nodelay(self.nodelay)?;
        if let Some(keepalive) = self.keepalive() {
            socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)?;
        }
        Ok(())
    }

    /// The socket2 keepalive parameters, `None` when keepalive is off.
    fn keepalive(&self) -> Option<socket2::TcpKeepalive> {
        if self.keepalive_time.is_none()
            && self.keepalive_interval.is_none()
            && self.keepalive_retries.is_none()
        {
            return None;
        }
        let mut keepalive = socket2::TcpKeepalive::new();
        if let Some(time) = self.keepalive_time {
            keepalive = keepalive.with_time(time);
        }
        if let Some(interval) = self.keepalive_interval {
            keepalive = keepalive.with_interval(interval);
        }
        if let Some(retries) = self.keepalive_retries {
            keepalive = keepalive.with_retries(retries);
        }
        Some(keepalive)
    }
}

/// Opens a Unix domain socket stream to a [`EndpointAddr::Unix`] path or (Linux) an
/// [`EndpointAddr::UnixAbstract`] name; the default connector's way to Unix targets, for
/// a connector of your own to reuse. TCP settings do not apply to Unix sockets.
///
/// A TCP address, or an abstract name on a system without the abstract namespace, is an
/// [`io::ErrorKind::InvalidInput`] error. Unix systems only.
#[cfg(unix)]
pub async fn connect_unix(addr: &EndpointAddr) -> io::Result<UnixStream> {
    match addr {
        EndpointAddr::Unix(path) => UnixStream::connect(path).await,
        EndpointAddr::UnixAbstract(name) => connect_abstract(name.clone()).await,
        EndpointAddr::Tcp(addr) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr} is a TCP address, not a Unix socket"),
        )),
    }
}

/// Connects to a name in Linux's abstract namespace (std adds the leading NUL). std's
/// connect blocks (a full listen backlog makes it wait), so it runs on the blocking pool and
/// the connected socket is handed to tokio.
#[cfg(any(target_os = "linux", target_os = "android"))]
async fn connect_abstract(name: std::sync::Arc<[u8]>) -> io::Result<UnixStream> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let stream = tokio::task::spawn_blocking(move || {
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&*name)?;
        let stream = std::os::unix::net::UnixStream::connect_addr(&addr)?;
        stream.set_nonblocking(true)?;
        Ok::<_, io::Error>(stream)
    })
    .await
    .map_err(io::Error::other)??;
    UnixStream::from_std(stream)
}

/// The abstract namespace is Linux's own.
#[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
async fn connect_abstract(_: std::sync::Arc<[u8]>) -> io::Result<UnixStream> {
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        "unix-abstract: sockets exist only on Linux",
    ))
}

/// Opens the byte stream for one connection.
pub trait Connect: fmt::Debug + Send + Sync + 'static {
    /// Connects to `dst`, with the TCP settings in [`Destination::tcp`] if it opens TCP. The
    /// pool bounds the whole attempt with its connect timeout.
    fn connect(&self, dst: &Destination) -> BoxFuture<'static, io::Result<BoxedIo>>;

    /// Whether this connector speaks TLS itself. For an `https://` target the pool puts its
    /// own TLS around a connector that does not (feature `tls`), or refuses the target
    /// (without that feature).
    fn supports_tls(&self) -> bool {
        false
    }
}

/// The default connector: plaintext TCP with the pool's TCP settings (those of each
/// [`Destination`]), and Unix domain sockets for `unix:` and `unix-abstract:` targets.
#[derive(Clone, Debug, Default)]
pub struct TcpConnector {
    _private: (),
}

impl TcpConnector {
    /// The TCP connector; its settings come with each destination.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Connect for TcpConnector {
    fn connect(&self, dst: &Destination) -> BoxFuture<'static, io::Result<BoxedIo>> {
        let (tcp, addr) = (dst.tcp.clone(), dst.addr.clone());
        Box::pin(async move {
            match addr {
                EndpointAddr::Tcp(addr) => Ok(Box::new(tcp.connect(addr).await?) as BoxedIo),
                #[cfg(unix)]
                unix => Ok(Box::new(connect_unix(&unix).await?) as BoxedIo),
                // Target parsing refuses Unix targets off Unix systems: never reached there.
                #[cfg(not(unix))]
                unix => Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("{unix}: Unix domain sockets need a Unix system"),
                )),
            }
        })
    }
}
