//! The operating system's resolver, for host names.

use super::{BoxFuture, Resolution, Resolve, ResolveError};
use crate::resolve::StaticResolver;
use crate::target::{Target, TargetKind};

/// Resolves host names with the operating system (`getaddrinfo`, through
/// [`tokio::net::lookup_host`]). It learns no TTL, so the pool re-resolves at its own pace.
/// IP literals and static lists are answered without a lookup.
#[derive(Clone, Debug, Default)]
pub struct SystemResolver {
    _priv: (),
}

impl SystemResolver {
    /// A new system resolver.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Resolve for SystemResolver {
    fn resolve(&self, target: &Target) -> BoxFuture<'static, Result<Resolution, ResolveError>> {
        if let Some(addrs) = StaticResolver::literal(target) {
            return Box::pin(std::future::ready(Ok(Resolution::new(addrs, None))));
        }
        let (host, port) = match target.kind() {
            TargetKind::Dns { host, port, .. } => (host.clone(), *port),
            // Static lists are literal and answered above; this arm only keeps the match total.
            _ => {
                return Box::pin(std::future::ready(Err(ResolveError::new(format!(
                    "target {target} has no host to look up"
                )))))
            }
        };
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| ResolveError::with_source(format!("lookup of {host} failed"), e))?;
            Ok(Resolution::new(addrs, None))
        })
    }
}
