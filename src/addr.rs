//! [`EndpointAddr`]: the address of one endpoint, the key the pool keeps endpoints by (its
//! design is on the type, which is public).

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// The address of one endpoint: a TCP socket address or a Unix domain socket.
///
/// An endpoint is a TCP socket address (what resolvers answer) or, for gRPC's `unix:` and
/// `unix-abstract:` targets, a Unix domain socket: a path, or a name in Linux's abstract
/// namespace. Every layer — the registry, growth, per-address settings, snapshots, events,
/// connectors — keys endpoints by this one type, so that a Unix endpoint is an endpoint like
/// any other.
///
/// Addresses are copied freely (into events, snapshots, the picker, each connection's
/// destination), so the Unix forms hold their path or name behind an [`Arc`]: a clone is a
/// reference count, never an allocation.
///
/// An `EndpointAddr` compares equal to a [`SocketAddr`] when it is that TCP address
/// (`snapshot.endpoints[0].addr == socket_addr` compiles and means what it says), and
/// displays as the target syntax writes it: `127.0.0.1:50051`, `[::1]:50051`,
/// `unix:/run/app.sock`, `unix-abstract:name` (bytes outside printable ASCII escaped).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum EndpointAddr {
    /// An IP socket address, connected to over TCP.
    Tcp(SocketAddr),
    /// A Unix domain socket at a file system path (`unix:path`, `unix:///abs/path`); a
    /// relative path is relative to the process's working directory when connecting.
    Unix(Arc<Path>),
    /// A Unix domain socket in Linux's abstract namespace (`unix-abstract:name`): the name
    /// without the leading NUL byte, which the connector adds.
    UnixAbstract(Arc<[u8]>),
}

impl EndpointAddr {
    /// A Unix domain socket address at `path`.
    pub fn unix(path: impl AsRef<Path>) -> Self {
        Self::Unix(Arc::from(path.as_ref()))
    }

    /// An abstract-namespace Unix socket address (Linux) named `name` (without the leading
    /// NUL byte).
    pub fn unix_abstract(name: impl AsRef<[u8]>) -> Self {
        Self::UnixAbstract(Arc::from(name.as_ref()))
    }

    /// The TCP socket address, if this is one.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(addr) => Some(*addr),
            Self::Unix(_) | Self::UnixAbstract(_) => None,
        }
    }

    /// Whether this is a Unix domain socket (a path or an abstract name).
    pub fn is_unix(&self) -> bool {
        matches!(self, Self::Unix(_) | Self::UnixAbstract(_))
    }
}

impl From<SocketAddr> for EndpointAddr {
    fn from(addr: SocketAddr) -> Self {
        Self::Tcp(addr)
    }
}

impl From<&EndpointAddr> for EndpointAddr {
    fn from(addr: &EndpointAddr) -> Self {
        addr.clone()
    }
}

impl PartialEq<SocketAddr> for EndpointAddr {
    fn eq(&self, other: &SocketAddr) -> bool {
        matches!(self, Self::Tcp(addr) if addr == other)
    }
}

impl PartialEq<EndpointAddr> for SocketAddr {
    fn eq(&self, other: &EndpointAddr) -> bool {
        other == self
    }
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => fmt::Display::fmt(addr, f),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::UnixAbstract(name) => write!(f, "unix-abstract:{}", name.escape_ascii()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each form displays as the target syntax writes it.
    #[test]
    fn displays_as_targets_write_it() {
        let tcp: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        assert_eq!(EndpointAddr::from(tcp).to_string(), "127.0.0.1:50051");
        assert_eq!(
            EndpointAddr::unix("/run/app.sock").to_string(),
            "unix:/run/app.sock"
        );
        assert_eq!(
            EndpointAddr::unix_abstract(b"app\0x").to_string(),
            "unix-abstract:app\\x00x"
        );
    }

    /// A TCP endpoint address equals its socket address, both ways; a Unix one equals none.
    #[test]
    fn compares_with_socket_addresses() {
        let tcp: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        assert_eq!(EndpointAddr::from(tcp), tcp);
        assert_eq!(tcp, EndpointAddr::from(tcp));
        assert_ne!(EndpointAddr::unix("/x"), tcp);
        assert_eq!(EndpointAddr::from(tcp).socket_addr(), Some(tcp));
        assert_eq!(EndpointAddr::unix("/x").socket_addr(), None);
    }
}
