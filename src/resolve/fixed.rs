//! The resolver for fixed address lists and IP literals.

use std::net::{IpAddr, SocketAddr};

use super::{BoxFuture, Resolution, Resolve, ResolveError};
use crate::target::{Target, TargetKind};

/// Answers with the addresses written in the target (`static:///…`, `ipv4:…`, or a DNS-form
/// target whose host is an IP literal). Never fails for those; fails for host names.
#[derive(Clone, Debug, Default)]
pub struct StaticResolver {
    _priv: (),
}

impl StaticResolver {
    /// A new static resolver.
    pub fn new() -> Self {
        Self::default()
    }

    /// The addresses of `target` if it names them literally.
    pub(crate) fn literal(target: &Target) -> Option<Vec<SocketAddr>> {
        match target.kind() {
            TargetKind::Static(addrs) => Some(addrs.clone()),
            TargetKind::Dns { host, port, .. } => host
                .parse::<IpAddr>()
                .ok()
                .map(|ip| vec![SocketAddr::new(ip, *port)]),
            // Only its own resolver knows what a custom target means; a Unix socket is not a
            // socket address (the worker connects to it without a resolver).
            TargetKind::Custom { .. } | TargetKind::Unix(_) => None,
        }
    }
}

impl Resolve for StaticResolver {
    fn resolve(&self, target: &Target) -> BoxFuture<'static, Result<Resolution, ResolveError>> {
        let answer = match Self::literal(target) {
            Some(addrs) => Ok(Resolution::new(addrs, None)),
            None => Err(ResolveError::new(format!(
                "target {target} names a host, not addresses"
            ))),
        };
        Box::pin(std::future::ready(answer))
    }
}
