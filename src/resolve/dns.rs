//! [`DnsResolver`]: DNS resolution with TTLs, built on hickory-resolver.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::TokioResolver;
use parking_lot::Mutex;

use super::{BoxFuture, Resolution, Resolve, ResolveError};
use crate::resolve::StaticResolver;
use crate::target::{Target, TargetKind};

/// The default bound on one resolution.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves host names with DNS, reporting the answer's TTL; built on
/// [hickory-resolver](hickory_resolver).
///
/// It asks DNS servers directly (UDP, with TCP when an answer is truncated) for the A and
/// AAAA records of a target's host, and returns the addresses together with the records' TTL,
/// so the pool can re-resolve when the answer expires.
///
/// Cloning is cheap; clones share the resolvers built for `dns://server/…` targets.
///
/// # Choices
///
/// - **No cache.** Every [`resolve`](Resolve::resolve) sends fresh queries: hickory's response
///   cache is sized 0, which turns it off entirely. The pool decides *when* to ask (at start, on
///   connection loss, when the TTL runs out, periodically); a cache below it would hand back
///   the answer the pool is trying to replace. Positive and negative answers alike are never
///   remembered, so a record that changes or reappears is seen on the next call.
/// - **TTL reporting.** [`Resolution::ttl`] is the smallest TTL among the answer records (A,
///   AAAA and any CNAME on the way), exactly as the server sent it: with the cache off the
///   records are fresh, and the value is read from the records rather than from hickory's
///   `valid_until` instant, which would lose a fraction of a second to the clock.
/// - **A and AAAA.** Both are asked in parallel; IPv4 addresses come first. A name with only
///   one family resolves to that family; an answer with no address at all is an error.
/// - **One try, bounded time.** Each query is sent once (hickory's `attempts`, which counts
///   *retries*, is 0): the pool has its own backoff. [`DnsResolver::timeout`] (5 s by default)
///   is hickory's per-query timeout, so a server that never answers fails the `resolve` after
///   that long; the A and AAAA queries run in parallel, and when only one of them goes
///   unanswered the other's addresses are returned. The whole `resolve` (search-list names
///   included, and whatever a caller's resolver is set to) is cut at 1.25 × the timeout; the
///   extra quarter lets a late-failing query report its sibling's answer instead of losing
///   it to the cut.
/// - **Names.** A host written with a final dot (`svc.example.test.`) is looked up exactly as
///   written. Other names follow the system configuration's `search` list and `ndots`, as the
///   C library does, with [`DnsResolver::system`]; resolvers pointed at an explicit server
///   ([`DnsResolver::with_server`], `dns://server/…` targets) have no search list, so every name
///   is looked up as written. The hosts file is not consulted (hickory would read it once and
///   never again); use [`SystemResolver`](crate::resolve::SystemResolver) for names that live
///   there. `localhost` is answered locally by hickory (RFC 6761), without a query.
/// - **Per-authority resolvers.** A target that names its DNS server (`dns://10.0.0.53/svc:443`)
///   is resolved by a resolver pointed at exactly that server, built at its first use and kept
///   for the next calls (one per distinct server), with the same settings.
/// - **Literals.** IP-literal hosts and static lists are answered without a query, with no TTL.
///
/// # Errors
///
/// Every failure is a [`ResolveError`] whose message names the host (and the server, when
/// known) and the kind of failure: `no such host` (NXDOMAIN), `resolver returned no addresses
/// for host` (NOERROR with no A/AAAA records), `answered SERVFAIL` (or another response
/// code), `timed out`, or an I/O error (with the cause as the error's source).
#[derive(Clone)]
pub struct DnsResolver {
    /// Where the default resolver's configuration came from.
    source: Source,
    /// The resolver for targets that name no DNS server (or why it could not be built).
    resolver: Result<TokioResolver, Arc<str>>,
    /// hickory's per-query timeout for the resolvers built here; 1.25 × bounds one `resolve`.
    timeout: Duration,
    /// Resolvers for targets that name their DNS server, built at first use.
    authorities: Arc<Mutex<HashMap<SocketAddr, TokioResolver>>>,
}

/// Where a [`DnsResolver`]'s default resolver comes from.
#[derive(Clone)]
enum Source {
    /// The system configuration (`/etc/resolv.conf`), as read at construction.
    System(Arc<(ResolverConfig, ResolverOpts)>),
    /// One server.
    Server(SocketAddr),
    /// A resolver configured by the caller.
    #[cfg_attr(not(feature = "hickory-types"), allow(dead_code))]
    Custom,
}

impl DnsResolver {
    /// A resolver that asks the system's DNS servers (`/etc/resolv.conf` on Unix, with its
    /// `search`, `domain` and `ndots` settings).
    ///
    /// Fails, without panicking, if the system configuration cannot be read or names no
    /// server.
    pub fn system() -> Result<Self, ResolveError> {
        let (config, opts) = hickory_resolver::system_conf::read_system_conf().map_err(|e| {
            ResolveError::with_source("cannot read the system DNS configuration", e)
        })?;
        Ok(Self::build(
            Source::System(Arc::new((config, opts))),
            DEFAULT_TIMEOUT,
        ))
    }

    /// A resolver that asks exactly the DNS server at `addr`, over UDP (TCP when an answer is
    /// truncated), with no search list.
    pub fn with_server(addr: SocketAddr) -> Self {
        Self::build(Source::Server(addr), DEFAULT_TIMEOUT)
    }

    /// A resolver that uses `resolver`, configured by the caller, for targets that name no DNS
    /// server.
    ///
    /// Its settings are used as they are, cache included: give it `cache_size = 0` so that
    /// every `resolve` reaches the server. Each `resolve` is still cut at 1.25 ×
    /// [`timeout`](Self::timeout). Targets that name their server (`dns://server/…`) get a
    /// resolver built here, with this type's defaults.
    ///
    /// Behind the `hickory-types` feature: it takes hickory-resolver's own type, and hickory
    /// is not 1.0 yet — its next release may change that type in a release of this crate that
    /// is not otherwise breaking.
    #[cfg(feature = "hickory-types")]
    pub fn from_resolver(resolver: TokioResolver) -> Self {
        Self {
            source: Source::Custom,
            resolver: Ok(resolver),
            timeout: DEFAULT_TIMEOUT,
            authorities: Arc::default(),
        }
    }

    /// Sets the lookup timeout (5 s by default): how long each query waits for its answer
    /// (for the resolvers built here) before `resolve` fails with a timeout error. A whole
    /// `resolve` never takes longer than 1.25 × this.
    ///
    /// Resolvers already built for `dns://server/…` targets are dropped and built again with
    /// the new timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self.authorities = Arc::default();
        if let Some(resolver) = self.source.build(timeout) {
            self.resolver = resolver;
        }
        self
    }

    /// The lookup timeout; see [`timeout`](Self::timeout).
    pub fn lookup_timeout(&self) -> Duration {
        self.timeout
    }

    fn build(source: Source, timeout: Duration) -> Self {
        let resolver = match source.build(timeout) {
            Some(resolver) => resolver,
            None => Err(Arc::from("no DNS configuration")),
        };
        Self {
            source,
            resolver,
            timeout,
            authorities: Arc::default(),
        }
    }

    /// The resolver for the DNS server a target names, built at first use.
    fn authority(&self, server: SocketAddr) -> Result<TokioResolver, Arc<str>> {
        let mut authorities = self.authorities.lock();
        if let Some(resolver) = authorities.get(&server) {
            return Ok(resolver.clone());
        }
        let resolver =
            build_resolver(server_config(server), ResolverOpts::default(), self.timeout)?;
        authorities.insert(server, resolver.clone());
        Ok(resolver)
    }
}

impl Source {
    /// The default resolver for this source, or `None` for a caller's resolver.
    fn build(&self, timeout: Duration) -> Option<Result<TokioResolver, Arc<str>>> {
        match self {
            Self::System(system) => {
                let (config, opts) = &**system;
                Some(build_resolver(config.clone(), opts.clone(), timeout))
            }
            Self::Server(addr) => Some(build_resolver(
                server_config(*addr),
                ResolverOpts::default(),
                timeout,
            )),
            Self::Custom => None,
        }
    }
}

/// A configuration with one server at `addr` (UDP, and TCP for truncated answers), no search
/// list.
fn server_config(addr: SocketAddr) -> ResolverConfig {
    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
    for connection in &mut server.connections {
        connection.port = addr.port();
    }
    ResolverConfig::from_parts(None, Vec::new(), vec![server])
}

/// `opts` with this module's settings applied.
fn apply_settings(mut opts: ResolverOpts, timeout: Duration) -> ResolverOpts {
    opts.timeout = timeout;
    // Never remember an answer: the pool decides when to ask.
    opts.cache_size = 0;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // hickory counts retries: 0 means each query is sent once.
    opts.attempts = 0;
    // hickory reads the hosts file once, at construction; a long-lived pool would never see
    // it change.
    opts.use_hosts_file = ResolveHosts::Never;
    opts
}

fn build_resolver(
    config: ResolverConfig,
    opts: ResolverOpts,
    timeout: Duration,
) -> Result<TokioResolver, Arc<str>> {
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(apply_settings(opts, timeout))
        .build()
        .map_err(|e| Arc::from(format!("cannot build the DNS resolver: {e}")))
}

impl fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.source {
            Source::System(system) => format!("system {:?}", system.0.name_servers()),
            Source::Server(addr) => format!("server {addr}"),
            Source::Custom => "custom resolver".to_owned(),
        };
        let mut authorities: Vec<SocketAddr> = self.authorities.lock().keys().copied().collect();
        authorities.sort();
        f.debug_struct("DnsResolver")
            .field("source", &source)
            .field("timeout", &self.timeout)
            .field("authorities", &authorities)
            .finish()
    }
}

impl Resolve for DnsResolver {
    fn resolve(&self, target: &Target) -> BoxFuture<'static, Result<Resolution, ResolveError>> {
        if let Some(addrs) = StaticResolver::literal(target) {
            return Box::pin(std::future::ready(Ok(Resolution::new(addrs, None))));
        }
        let TargetKind::Dns { server, host, port } = target.kind().clone() else {
            let err = ResolveError::new(format!("target {target} has no host name to resolve"));
            return Box::pin(std::future::ready(Err(err)));
        };
        let (resolver, server) = match (server, &self.source) {
            (Some(server), _) => (self.authority(server), Some(server)),
            (None, Source::Server(addr)) => (self.resolver.clone(), Some(*addr)),
            (None, _) => (self.resolver.clone(), None),
        };
        let lookup = Lookup {
            host,
            server: match server {
                Some(addr) => format!("DNS server {addr}"),
                None => "the DNS server".to_owned(),
            },
            timeout: self.timeout,
        };
        Box::pin(async move {
            let resolver = resolver.map_err(|e| lookup.failed(e))?;
            let deadline = lookup.timeout + lookup.timeout / 4;
            let answer = tokio::time::timeout(deadline, resolver.lookup_ip(&*lookup.host));
            let answer = match answer.await {
                Ok(Ok(answer)) => answer,
                Ok(Err(err)) => return Err(lookup.error(err)),
                Err(_) => return Err(lookup.timed_out()),
            };
            let addrs: Vec<SocketAddr> = answer
                .iter()
                .map(|ip: IpAddr| SocketAddr::new(ip, port))
                .collect();
            if addrs.is_empty() {
                return Err(lookup.no_addresses());
            }
            // The records' own TTLs: with the cache off they are exactly as the server sent
            // them. CNAMEs count, since the answer holds only while its chain does.
            let ttl = answer
                .as_lookup()
                .answers()
                .iter()
                .filter(|r| {
                    matches!(
                        r.record_type(),
                        RecordType::A | RecordType::AAAA | RecordType::CNAME
                    )
                })
                .map(|r| r.ttl)
                .min()
                .map(|secs| Duration::from_secs(u64::from(secs)));
            Ok(Resolution::new(addrs, ttl))
        })
    }
}

/// One lookup, for its error messages.
struct Lookup {
    host: String,
    /// The server asked, as the messages name it.
    server: String,
    timeout: Duration,
}

impl Lookup {
    fn failed(&self, cause: impl fmt::Display) -> ResolveError {
        ResolveError::new(format!("DNS lookup of host {} failed: {cause}", self.host))
    }

    fn timed_out(&self) -> ResolveError {
        ResolveError::new(format!(
            "DNS lookup of host {} timed out: no answer from {} within {:?}",
            self.host, self.server, self.timeout
        ))
    }

    fn no_addresses(&self) -> ResolveError {
        ResolveError::new(format!(
            "resolver returned no addresses for host {}: {} answered no A or AAAA records",
            self.host, self.server
        ))
    }

    fn response_code(&self, code: ResponseCode) -> ResolveError {
        self.failed(format_args!(
            "{} answered {} ({code})",
            self.server,
            rcode_name(code)
        ))
    }

    /// Turns hickory's error into a message that names the host and the kind of failure.
    fn error(&self, err: NetError) -> ResolveError {
        let (host, server) = (&self.host, &self.server);
        match &err {
            NetError::Dns(DnsError::NoRecordsFound(no_records)) => match no_records.response_code {
                ResponseCode::NXDomain => {
                    ResolveError::new(format!("no such host {host}: {server} answered NXDOMAIN"))
                }
                ResponseCode::NoError => self.no_addresses(),
                code => self.response_code(code),
            },
            NetError::Dns(DnsError::ResponseCode(code)) => self.response_code(*code),
            NetError::Timeout => self.timed_out(),
            NetError::Io(_) => ResolveError::with_source(
                format!("DNS lookup of host {host} failed: I/O error talking to {server}"),
                err,
            ),
            NetError::NoConnections => ResolveError::with_source(
                format!("DNS lookup of host {host} failed: {server} could not be reached"),
                err,
            ),
            _ => ResolveError::with_source(
                format!("DNS lookup of host {host} failed asking {server}"),
                err,
            ),
        }
    }
}

/// The mnemonic of a DNS response code, as `dig` prints it.
fn rcode_name(code: ResponseCode) -> String {
    let name = match code {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::YXDomain => "YXDOMAIN",
        ResponseCode::YXRRSet => "YXRRSET",
        ResponseCode::NXRRSet => "NXRRSET",
        ResponseCode::NotAuth => "NOTAUTH",
        ResponseCode::NotZone => "NOTZONE",
        other => return format!("RCODE {}", u16::from(other)),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rcode_names() {
        assert_eq!(rcode_name(ResponseCode::ServFail), "SERVFAIL");
        assert_eq!(rcode_name(ResponseCode::Refused), "REFUSED");
        assert_eq!(rcode_name(ResponseCode::BADCOOKIE), "RCODE 23");
    }

    #[test]
    fn server_config_uses_the_port() {
        let config = server_config("127.0.0.1:5353".parse().unwrap());
        assert!(config.search().is_empty());
        assert!(config.domain().is_none());
        let servers = config.name_servers();
        assert_eq!(servers.len(), 1);
        assert!(servers[0].connections.iter().all(|c| c.port == 5353));
    }

    #[test]
    fn opts_turn_the_cache_off() {
        let opts = apply_settings(ResolverOpts::default(), Duration::from_millis(300));
        assert_eq!(opts.timeout, Duration::from_millis(300));
        assert_eq!(opts.cache_size, 0);
        assert_eq!(opts.attempts, 0);
        assert_eq!(opts.ip_strategy, LookupIpStrategy::Ipv4AndIpv6);
        assert_eq!(opts.use_hosts_file, ResolveHosts::Never);
    }
}
