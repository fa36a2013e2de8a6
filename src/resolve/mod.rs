//! Resolution: turning a [`Target`] into the set of addresses the pool connects to.
//!
//! The pool only knows the small [`Resolve`] trait: one call returns the current addresses and
//! how long they may be trusted. The worker decides *when* to ask (at start, on connection loss,
//! periodically); resolvers never cache. Three implementations ship here: [`StaticResolver`]
//! for address lists and IP literals, [`DnsResolver`] (hickory, with the answer's TTL, used for
//! host names by default) and [`SystemResolver`], the operating system's resolver
//! (`getaddrinfo` through tokio, no TTL).
//!
//! A resolver of your own can own a scheme of its own (`k8s:///ns/svc:8080`, see
//! [`PoolBuilder::resolver_for_scheme`](crate::PoolBuilder::resolver_for_scheme)). Callers
//! who already have a discovery stream push addresses instead, with a [`Push`] handle (see
//! the [`push`] module docs): the pool then resolves nothing.

mod dns;
mod fixed;
pub mod push;
mod system;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use dns::DnsResolver;
pub use fixed::StaticResolver;
pub(crate) use push::AddressSink;
pub use push::Push;
pub use system::SystemResolver;

use crate::target::Target;

pub use crate::BoxFuture;

/// The answer of one resolution.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Resolution {
    /// The addresses, in the resolver's order, without duplicates.
    pub addresses: Vec<SocketAddr>,
    /// How long the answer may be trusted (a DNS TTL), if the resolver knows.
    pub ttl: Option<Duration>,
}

impl Resolution {
    /// An answer with these addresses (duplicates dropped) and an optional TTL.
    pub fn new(addresses: impl IntoIterator<Item = SocketAddr>, ttl: Option<Duration>) -> Self {
        let mut unique = Vec::new();
        for addr in addresses {
            if !unique.contains(&addr) {
                unique.push(addr);
            }
        }
        Self {
            addresses: unique,
            ttl,
        }
    }
}

/// Why a resolution failed.
#[derive(Debug)]
pub struct ResolveError {
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl ResolveError {
    /// An error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// An error with a message and its cause.
    pub fn with_source(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ResolveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| &**s as &(dyn std::error::Error + 'static))
    }
}

/// Finds the addresses of a target.
///
/// Implementations must not cache: the pool calls `resolve` when it wants a fresh answer. An
/// empty answer is treated by the pool as an error (it keeps the last good set).
pub trait Resolve: fmt::Debug + Send + Sync + 'static {
    /// Resolves `target` once.
    fn resolve(&self, target: &Target) -> BoxFuture<'static, Result<Resolution, ResolveError>>;
}

/// Where a pool's addresses come from.
#[derive(Debug)]
pub(crate) enum Source {
    /// A resolver the worker asks when it wants a fresh answer.
    Resolver(Arc<dyn Resolve>),
    /// A set the caller pushes ([`Push`]); nothing is resolved.
    Push(Push),
    /// One address that needs no resolving and never changes: a `unix:` target's socket.
    Fixed(crate::addr::EndpointAddr),
}
