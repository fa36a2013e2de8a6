//! Parsing of target strings into a [`Target`].
//!
//! The grammar is gRPC's naming scheme (`doc/naming.md`), plus the `http(s)://` form tonic
//! users already write, and a `static:///` list for fixed address sets:
//!
//! | target | meaning |
//! |---|---|
//! | `dns:///host:port`, `dns:host:port` | resolve `host` with DNS; port 443 when omitted |
//! | `dns://10.0.0.53[:53]/host:port` | the same, asking that DNS server (port 53 by default) |
//! | `host:port`, `host` | shorthand for `dns:///host:port` (port 443 when omitted) |
//! | `http://host:port`, `https://host:port` | DNS as above; the scheme sets plaintext or TLS; default ports 80 and 443 |
//! | `static:///1.2.3.4:50051,[::1]:50051` | exactly these addresses, never resolved; ports required |
//! | `ipv4:1.2.3.4[:port],…`, `ipv6:[::1][:port],…` | gRPC's literal lists; port 443 when omitted |
//! | `unix:path`, `unix:///abs/path` | the Unix domain socket at `path` (relative to the working directory, or absolute); one endpoint, never resolved |
//! | `unix-abstract:name` | (Linux) the socket `name` in the abstract namespace (the leading NUL added by the pool; `%XX` escapes decoded, so `%00` is a NUL); one endpoint |
//! | `scheme://[authority]/endpoint`, `scheme:endpoint` | a scheme of your own, e.g. `k8s:///ns/svc:8080`: [`TargetKind::Custom`], resolved by the resolver registered for it |
//!
//! A host that is an IP literal is used as is, without a DNS query. IPv6 literals go in
//! brackets. Every malformed target is a [`TargetError`] that names the problem.
//!
//! ## Unix domain sockets
//!
//! A `unix:` or `unix-abstract:` target is [`TargetKind::Unix`]: one fixed
//! [`EndpointAddr`] (sidecars and local proxies), which no resolver sees. As gRPC does, its
//! requests carry `:authority` `localhost` ([`Target::authority`], [`Target::host`]), which
//! is also the name a TLS connector verifies unless a server name is given. `unix://` must be
//! followed by an absolute path (`unix:///run/app.sock`: three slashes; an authority such as
//! `unix://host/path` is refused). An empty path or name, or a path with a NUL byte, is a
//! [`TargetError::InvalidUnixPath`]; a path that does not exist parses (the socket may come
//! later) and fails to connect, leaving the pool in TransientFailure with the error. On
//! systems without them the schemes are [`TargetError::UnsupportedScheme`].
//!
//! ## Schemes of your own
//!
//! A resolver registered with
//! [`PoolBuilder::resolver_for_scheme`](crate::PoolBuilder::resolver_for_scheme) owns its
//! scheme: targets with it parse (with [`Target::parse_with_schemes`]) into
//! [`TargetKind::Custom`], split as gRPC's naming document splits them —
//! `scheme://authority/endpoint`, or `scheme:endpoint` without an authority — and the
//! resolver makes sense of the authority and the endpoint. A scheme nobody registered stays a
//! [`TargetError::UnknownScheme`]; the built-in schemes cannot be taken over (a resolver for
//! them is given with [`PoolBuilder::resolver`](crate::PoolBuilder::resolver)).
//!
//! A custom target's host — what requests carry as `:authority` and what a TLS connector
//! verifies — is its endpoint when the endpoint is a `host[:port]` (`consul:///billing`,
//! `mesh:///billing.internal:443`); otherwise (`k8s:///ns/svc:8080`) it names no host, the
//! `:authority` is `localhost` (as gRPC does for targets without one), and
//! [`PoolBuilder::origin`](crate::PoolBuilder::origin) sets a real one.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use crate::addr::EndpointAddr;

/// The default port of DNS targets without one (gRPC's rule).
const DEFAULT_GRPC_PORT: u16 = 443;
/// The default port of a DNS server named in a target's authority.
const DEFAULT_DNS_SERVER_PORT: u16 = 53;

/// A parsed target: what to resolve, how, and what to put in each request's `:authority`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    source: String,
    kind: TargetKind,
    tls: bool,
}

/// How a target's addresses are found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TargetKind {
    /// A fixed list of addresses, never resolved.
    Static(Vec<SocketAddr>),
    /// A name to look up in DNS.
    Dns {
        /// The DNS server to ask, when the target names one (`dns://server/host:port`).
        server: Option<SocketAddr>,
        /// The host name to resolve.
        host: String,
        /// The port every resolved address gets.
        port: u16,
    },
    /// A Unix domain socket (`unix:path`, `unix:///abs/path`, `unix-abstract:name`): an
    /// [`EndpointAddr::Unix`] or [`EndpointAddr::UnixAbstract`], the pool's one endpoint.
    Unix(EndpointAddr),
    /// A target of a scheme a user's resolver registered
    /// ([`PoolBuilder::resolver_for_scheme`](crate::PoolBuilder::resolver_for_scheme)), in
    /// gRPC's `scheme://authority/endpoint` form; only that resolver gives it meaning.
    Custom {
        /// The scheme, in lower case (`k8s`).
        scheme: String,
        /// The authority between `//` and the next `/`; empty when the target has none
        /// (`k8s:///ns/svc`, `k8s:ns/svc`).
        authority: String,
        /// Everything after the authority (`ns/svc:8080`); never empty.
        endpoint: String,
    },
}

/// The schemes the parser knows itself (`unix` and `unix-abstract` included); a resolver
/// cannot register them.
pub(crate) const BUILT_IN_SCHEMES: &[&str] = &[
    "dns",
    "static",
    "ipv4",
    "ipv6",
    "http",
    "https",
    "unix",
    "unix-abstract",
];

/// Why a target string could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TargetError {
    /// The target is empty or only white space.
    Empty,
    /// The scheme is not one of `dns`, `static`, `ipv4`, `ipv6`, `http`, `https`, nor one a
    /// resolver registered.
    UnknownScheme(String),
    /// A target of a registered scheme has nothing after its scheme and authority.
    MissingEndpoint(String),
    /// A scheme of gRPC's naming that this platform does not support: `unix` off Unix
    /// systems, `unix-abstract` off Linux.
    UnsupportedScheme(String),
    /// A `unix:` or `unix-abstract:` target names no usable socket: the path or name is
    /// empty, a path has a NUL byte, or `unix://` is not followed by an absolute path.
    InvalidUnixPath(String),
    /// A host is missing (e.g. `dns:///:50051`).
    MissingHost,
    /// The host is not a valid DNS name or IP literal.
    InvalidHost(String),
    /// An IPv6 literal is not in brackets, or the brackets are unbalanced.
    InvalidIpv6(String),
    /// The port is not a number in 1..=65535.
    InvalidPort(String),
    /// A port is required here (static lists) but missing.
    MissingPort(String),
    /// An address list (`static:`, `ipv4:`, `ipv6:`) is empty or has an empty element.
    EmptyAddressList,
    /// An element of an address list is not an address of the list's kind.
    InvalidAddress(String),
    /// The DNS server in `dns://server/…` is not an IP address with an optional port.
    InvalidDnsServer(String),
    /// Something follows the host and port that the target form does not allow (a path,
    /// a query, user info).
    UnexpectedPart(String),
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("target is empty"),
            Self::UnknownScheme(s) => write!(
                f,
                "unknown target scheme {s:?} (expected dns, static, ipv4, ipv6, http, https, \
                 or a scheme registered with PoolBuilder::resolver_for_scheme)"
            ),
            Self::MissingEndpoint(t) => write!(f, "target {t:?} has no endpoint after its scheme"),
            Self::UnsupportedScheme(s) => write!(
                f,
                "target scheme {s:?} is not supported on this platform (unix needs a Unix \
                 system, unix-abstract Linux)"
            ),
            Self::InvalidUnixPath(t) => write!(
                f,
                "target {t:?} names no Unix socket (expected unix:path, unix:///absolute/path \
                 or unix-abstract:name, non-empty, without NUL bytes in a path)"
            ),
            Self::MissingHost => f.write_str("target has no host"),
            Self::InvalidHost(h) => write!(f, "invalid host {h:?}"),
            Self::InvalidIpv6(h) => {
                write!(f, "invalid IPv6 literal {h:?} (use brackets: [::1]:50051)")
            }
            Self::InvalidPort(p) => write!(f, "invalid port {p:?} (expected 1..=65535)"),
            Self::MissingPort(a) => write!(f, "address {a:?} needs a port"),
            Self::EmptyAddressList => f.write_str("address list is empty or has an empty element"),
            Self::InvalidAddress(a) => write!(f, "invalid address {a:?}"),
            Self::InvalidDnsServer(s) => write!(f, "invalid DNS server {s:?} (expected ip[:port])"),
            Self::UnexpectedPart(p) => write!(f, "unexpected {p:?} in target"),
        }
    }
}

impl std::error::Error for TargetError {}

impl Target {
    /// Parses a target string; see the [module docs](self) for the grammar.
    pub fn parse(target: &str) -> Result<Self, TargetError> {
        Self::parse_with_schemes::<&str>(target, &[])
    }

    /// Parses a target string, letting these schemes of resolvers of your own through as
    /// [`TargetKind::Custom`] (see the [module docs](self#schemes-of-your-own)). Schemes
    /// match without regard to case; a built-in scheme in `schemes` changes nothing.
    pub fn parse_with_schemes<S: AsRef<str>>(
        target: &str,
        schemes: &[S],
    ) -> Result<Self, TargetError> {
        let source = target.trim();
        if source.is_empty() {
            return Err(TargetError::Empty);
        }
        let custom = |scheme: &str| {
            !is_built_in(scheme)
                && schemes
                    .iter()
                    .any(|s| s.as_ref().eq_ignore_ascii_case(scheme))
        };
        let (kind, tls) = parse_kind(source, &custom)?;
        Ok(Self {
            source: source.to_owned(),
            kind,
            tls,
        })
    }

    /// How the addresses are found.
    pub fn kind(&self) -> &TargetKind {
        &self.kind
    }

    /// The target as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The canonical target string, as gRPC names a channel's target in its metrics
    /// (gRFC A66's `grpc.target`): a target written without a scheme gets gRPC's default
    /// one (`svc:50051` → `dns:///svc:50051`); a target of gRPC's own schemes (`dns:`,
    /// `static:`, `ipv4:`, `ipv6:`, `unix:`, `unix-abstract:`) or of a registered one stays
    /// as written, its scheme in lower case; `http(s)://host[:port]`, tonic's form that gRPC
    /// does not know, is the DNS target it resolves as, with its port (`http://svc` →
    /// `dns:///svc:80`).
    pub fn canonical(&self) -> String {
        let is_custom = |scheme: &str| matches!(&self.kind, TargetKind::Custom { scheme: s, .. } if s.eq_ignore_ascii_case(scheme));
        match split_scheme(&self.source, &is_custom) {
            None => format!("dns:///{}", self.source),
            Some((scheme, _))
                if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
            {
                format!("dns:///{}", self.authority())
            }
            Some((scheme, rest)) => format!("{}:{rest}", scheme.to_ascii_lowercase()),
        }
    }

    /// Whether the target asked for TLS (`https://`).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The `:authority` requests carry by default: `host:port` for DNS targets, the first
    /// address for static lists, `localhost` for a Unix socket (as gRPC); for a custom target
    /// its endpoint when that is a `host[:port]`, else `localhost`.
    pub fn authority(&self) -> String {
        match &self.kind {
            TargetKind::Dns { host, port, .. } => {
                if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                }
            }
            TargetKind::Static(addrs) => addrs[0].to_string(),
            TargetKind::Unix(_) => "localhost".to_owned(),
            TargetKind::Custom { endpoint, .. } => match endpoint_host(endpoint) {
                Some(_) => endpoint.clone(),
                None => "localhost".to_owned(),
            },
        }
    }

    /// The host name (or IP literal) the target names, which a TLS connector verifies the
    /// server's certificate against: the host of a DNS target; the endpoint's host for a
    /// custom target whose endpoint is a `host[:port]`; `localhost` for a Unix socket (as
    /// gRPC); `None` for address lists and other custom targets.
    pub fn host(&self) -> Option<&str> {
        match &self.kind {
            TargetKind::Dns { host, .. } => Some(host),
            TargetKind::Static(_) => None,
            TargetKind::Unix(_) => Some("localhost"),
            TargetKind::Custom { endpoint, .. } => endpoint_host(endpoint),
        }
    }
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn is_built_in(scheme: &str) -> bool {
    BUILT_IN_SCHEMES
        .iter()
        .any(|b| b.eq_ignore_ascii_case(scheme))
}

/// The host of a custom target's endpoint, when the endpoint is a valid `host[:port]`.
fn endpoint_host(endpoint: &str) -> Option<&str> {
    match parse_dns_host_port(None, endpoint, DEFAULT_GRPC_PORT) {
        Ok(_) => split_host_port(endpoint).ok().map(|(host, _)| host),
        Err(_) => None,
    }
}

/// `unix:path`, `unix:///absolute/path` or `unix-abstract:name` (`scheme` in lower case).
fn parse_unix(scheme: &str, rest: &str, source: &str) -> Result<TargetKind, TargetError> {
    let invalid = || TargetError::InvalidUnixPath(source.to_owned());
    if !cfg!(unix)
        || (scheme == "unix-abstract" && !cfg!(any(target_os = "linux", target_os = "android")))
    {
        return Err(TargetError::UnsupportedScheme(scheme.to_owned()));
    }
    if scheme == "unix-abstract" {
        let name = percent_decode(rest).ok_or_else(invalid)?;
        if name.is_empty() {
            return Err(invalid());
        }
        return Ok(TargetKind::Unix(EndpointAddr::unix_abstract(name)));
    }
    // `unix://` takes an empty authority and an absolute path: three slashes in all.
    let path = match rest.strip_prefix("//") {
        Some(after) if after.starts_with('/') => after,
        Some(_) => return Err(invalid()),
        None => rest,
    };
    if path.is_empty() || path.contains('\0') {
        return Err(invalid());
    }
    Ok(TargetKind::Unix(EndpointAddr::unix(path)))
}

/// `s` with its `%XX` escapes decoded; `None` for a `%` not followed by two hex digits.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            let hex = std::str::from_utf8(&hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    Some(out)
}

/// `scheme://authority/endpoint` or `scheme:endpoint`, for a scheme a resolver registered.
fn parse_custom(scheme: &str, rest: &str, source: &str) -> Result<TargetKind, TargetError> {
    let (authority, endpoint) = match rest.strip_prefix("//") {
        Some(after) => after.split_once('/').unwrap_or((after, "")),
        None => ("", rest),
    };
    if endpoint.is_empty() {
        return Err(TargetError::MissingEndpoint(source.to_owned()));
    }
    Ok(TargetKind::Custom {
        scheme: scheme.to_ascii_lowercase(),
        authority: authority.to_owned(),
        endpoint: endpoint.to_owned(),
    })
}

fn parse_kind(s: &str, custom: &dyn Fn(&str) -> bool) -> Result<(TargetKind, bool), TargetError> {
    let Some((scheme, rest)) = split_scheme(s, custom) else {
        // No scheme: `host:port` or `host` means DNS.
        return Ok((parse_dns_host_port(None, s, DEFAULT_GRPC_PORT)?, false));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "dns" => {
            // dns:[//authority/]host[:port]
            let (server, host_port) = match rest.strip_prefix("//") {
                Some(after) => {
                    let (authority, path) =
                        after.split_once('/').ok_or(TargetError::MissingHost)?;
                    let server = if authority.is_empty() {
                        None
                    } else {
                        Some(parse_dns_server(authority)?)
                    };
                    (server, path)
                }
                None => (None, rest),
            };
            Ok((
                parse_dns_host_port(server, host_port, DEFAULT_GRPC_PORT)?,
                false,
            ))
        }
        "http" | "https" => {
            let tls = scheme.eq_ignore_ascii_case("https");
            let after = rest
                .strip_prefix("//")
                .ok_or_else(|| TargetError::UnexpectedPart(rest.to_owned()))?;
            let (authority, path) = match after.find(['/', '?', '#']) {
                Some(i) => after.split_at(i),
                None => (after, ""),
            };
            if !(path.is_empty() || path == "/") {
                return Err(TargetError::UnexpectedPart(path.to_owned()));
            }
            let default_port = if tls { 443 } else { 80 };
            Ok((parse_dns_host_port(None, authority, default_port)?, tls))
        }
        "static" => {
            let list = rest
                .strip_prefix("///")
                .or_else(|| rest.strip_prefix("//"))
                .unwrap_or(rest);
            let addrs = parse_list(list, None, parse_ip_host)?;
            Ok((TargetKind::Static(addrs), false))
        }
        "ipv4" => {
            let addrs = parse_list(rest, Some(DEFAULT_GRPC_PORT), |host| {
                host.parse::<Ipv4Addr>()
                    .map(IpAddr::V4)
                    .map_err(|_| TargetError::InvalidAddress(host.to_owned()))
            })?;
            Ok((TargetKind::Static(addrs), false))
        }
        "ipv6" => {
            let addrs = parse_list(rest, Some(DEFAULT_GRPC_PORT), |host| {
                let inner = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                inner
                    .parse::<Ipv6Addr>()
                    .map(IpAddr::V6)
                    .map_err(|_| TargetError::InvalidAddress(host.to_owned()))
            })?;
            Ok((TargetKind::Static(addrs), false))
        }
        scheme @ ("unix" | "unix-abstract") => Ok((parse_unix(scheme, rest, s)?, false)),
        other if custom(other) => Ok((parse_custom(other, rest, s)?, false)),
        other => Err(TargetError::UnknownScheme(other.to_owned())),
    }
}

/// Splits `scheme:rest` when `s` starts with a URI scheme. `host:port` is not a scheme: a
/// scheme is followed by `//`, or is one of gRPC's schemes that take an opaque part, or a
/// registered one (`custom`).
fn split_scheme<'a>(s: &'a str, custom: &dyn Fn(&str) -> bool) -> Option<(&'a str, &'a str)> {
    let (scheme, rest) = s.split_once(':')?;
    let valid = !scheme.is_empty()
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !valid {
        return None;
    }
    let opaque = is_built_in(scheme) || custom(scheme);
    if rest.starts_with("//") || opaque {
        Some((scheme, rest))
    } else {
        None
    }
}

/// Splits `host[:port]` (with `[v6]:port`), returning the host without brackets.
fn split_host_port(s: &str) -> Result<(&str, Option<&str>), TargetError> {
    if let Some(after) = s.strip_prefix('[') {
        let (host, rest) = after
            .split_once(']')
            .ok_or_else(|| TargetError::InvalidIpv6(s.to_owned()))?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(TargetError::InvalidIpv6(s.to_owned()));
        }
        return match rest {
            "" => Ok((host, None)),
            _ => match rest.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(TargetError::UnexpectedPart(rest.to_owned())),
            },
        };
    }
    match s.matches(':').count() {
        0 => Ok((s, None)),
        1 => {
            let (host, port) = s.split_once(':').expect("one colon");
            Ok((host, Some(port)))
        }
        _ => Err(TargetError::InvalidIpv6(s.to_owned())),
    }
}

fn parse_port(port: &str) -> Result<u16, TargetError> {
    match port.parse::<u16>() {
        Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(TargetError::InvalidPort(port.to_owned())),
    }
}

fn parse_dns_server(authority: &str) -> Result<SocketAddr, TargetError> {
    let bad = || TargetError::InvalidDnsServer(authority.to_owned());
    let (host, port) = split_host_port(authority).map_err(|_| bad())?;
    let ip: IpAddr = host.parse().map_err(|_| bad())?;
    let port = match port {
        Some(p) => parse_port(p).map_err(|_| bad())?,
        None => DEFAULT_DNS_SERVER_PORT,
    };
    Ok(SocketAddr::new(ip, port))
}

fn parse_dns_host_port(
    server: Option<SocketAddr>,
    s: &str,
    default_port: u16,
) -> Result<TargetKind, TargetError> {
    if s.is_empty() {
        return Err(TargetError::MissingHost);
    }
    if let Some(i) = s.find(['/', '?', '#', '@']) {
        return Err(TargetError::UnexpectedPart(s[i..].to_owned()));
    }
    let (host, port) = split_host_port(s)?;
    if host.is_empty() {
        return Err(TargetError::MissingHost);
    }
    let port = match port {
        Some(p) => parse_port(p)?,
        None => default_port,
    };
    if host.parse::<IpAddr>().is_err() {
        validate_dns_name(host)?;
    }
    Ok(TargetKind::Dns {
        server,
        host: host.to_owned(),
        port,
    })
}

fn validate_dns_name(host: &str) -> Result<(), TargetError> {
    let name = host.strip_suffix('.').unwrap_or(host);
    let bad = || TargetError::InvalidHost(host.to_owned());
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

fn parse_ip_host(host: &str) -> Result<IpAddr, TargetError> {
    host.parse::<IpAddr>()
        .map_err(|_| TargetError::InvalidAddress(host.to_owned()))
}

fn parse_list(
    list: &str,
    default_port: Option<u16>,
    parse_host: impl Fn(&str) -> Result<IpAddr, TargetError>,
) -> Result<Vec<SocketAddr>, TargetError> {
    if list.trim().is_empty() {
        return Err(TargetError::EmptyAddressList);
    }
    let mut addrs = Vec::new();
    for item in list.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(TargetError::EmptyAddressList);
        }
        let (host, port) = split_host_port(item)?;
        let ip = parse_host(host)?;
        let port = match (port, default_port) {
            (Some(p), _) => parse_port(p)?,
            (None, Some(d)) => d,
            (None, None) => return Err(TargetError::MissingPort(item.to_owned())),
        };
        let addr = SocketAddr::new(ip, port);
        // A duplicate would be one endpoint; keep the first.
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn valid_targets() {
        let cases: Vec<(&str, TargetKind, bool)> = vec![
            (
                "static:///127.0.0.2:50051,127.0.0.3:50051",
                TargetKind::Static(vec![sa("127.0.0.2:50051"), sa("127.0.0.3:50051")]),
                false,
            ),
            (
                "static:///[::1]:50051,127.0.0.1:1",
                TargetKind::Static(vec![sa("[::1]:50051"), sa("127.0.0.1:1")]),
                false,
            ),
            (
                "ipv4:127.0.0.1,127.0.0.2:9",
                TargetKind::Static(vec![sa("127.0.0.1:443"), sa("127.0.0.2:9")]),
                false,
            ),
            (
                "ipv6:[::1]:7",
                TargetKind::Static(vec![sa("[::1]:7")]),
                false,
            ),
            (
                "localhost:50051",
                TargetKind::Dns {
                    server: None,
                    host: "localhost".into(),
                    port: 50051,
                },
                false,
            ),
            (
                "svc.ns.svc.cluster.local",
                TargetKind::Dns {
                    server: None,
                    host: "svc.ns.svc.cluster.local".into(),
                    port: 443,
                },
                false,
            ),
            (
                "dns:///svc.ns.svc.cluster.local:50051",
                TargetKind::Dns {
                    server: None,
                    host: "svc.ns.svc.cluster.local".into(),
                    port: 50051,
                },
                false,
            ),
            (
                "dns:svc:1",
                TargetKind::Dns {
                    server: None,
                    host: "svc".into(),
                    port: 1,
                },
                false,
            ),
            (
                "dns://127.0.0.1:5353/svc:1",
                TargetKind::Dns {
                    server: Some(sa("127.0.0.1:5353")),
                    host: "svc".into(),
                    port: 1,
                },
                false,
            ),
            (
                "dns://127.0.0.1/svc:1",
                TargetKind::Dns {
                    server: Some(sa("127.0.0.1:53")),
                    host: "svc".into(),
                    port: 1,
                },
                false,
            ),
            (
                "http://127.0.0.1:8080",
                TargetKind::Dns {
                    server: None,
                    host: "127.0.0.1".into(),
                    port: 8080,
                },
                false,
            ),
            (
                "https://example.test/",
                TargetKind::Dns {
                    server: None,
                    host: "example.test".into(),
                    port: 443,
                },
                true,
            ),
            (
                "http://[::1]",
                TargetKind::Dns {
                    server: None,
                    host: "::1".into(),
                    port: 80,
                },
                false,
            ),
        ];
        for (input, kind, tls) in cases {
            let t = Target::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(t.kind(), &kind, "{input}");
            assert_eq!(t.is_tls(), tls, "{input}");
        }
    }

    /// gRPC's Unix forms: a relative or absolute path (`unix://` takes three slashes), an
    /// abstract name with its `%XX` escapes decoded; all of them `localhost` as authority.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn unix_targets() {
        let cases = [
            ("unix:relative/sock", EndpointAddr::unix("relative/sock")),
            ("unix:/tmp/sock", EndpointAddr::unix("/tmp/sock")),
            ("unix:///tmp/sock", EndpointAddr::unix("/tmp/sock")),
            ("UNIX:/tmp/sock", EndpointAddr::unix("/tmp/sock")),
            ("unix-abstract:name", EndpointAddr::unix_abstract("name")),
            (
                "unix-abstract:grpc%00abstract",
                EndpointAddr::unix_abstract(b"grpc\0abstract"),
            ),
        ];
        for (input, addr) in cases {
            let t = Target::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(t.kind(), &TargetKind::Unix(addr), "{input}");
            assert_eq!(t.authority(), "localhost", "{input}");
            assert_eq!(t.host(), Some("localhost"), "{input}");
            assert!(!t.is_tls());
        }
    }

    /// Every malformed target maps to the error that names its problem.
    #[test]
    fn malformed_targets() {
        use TargetError::*;
        let cases: Vec<(&str, TargetError)> = vec![
            ("", Empty),
            ("   ", Empty),
            ("ftp://host:1", UnknownScheme("ftp".into())),
            ("unix:", InvalidUnixPath("unix:".into())),
            ("unix://", InvalidUnixPath("unix://".into())),
            (
                "unix://host/sock",
                InvalidUnixPath("unix://host/sock".into()),
            ),
            ("unix:a\0b", InvalidUnixPath("unix:a\0b".into())),
            ("unix-abstract:", InvalidUnixPath("unix-abstract:".into())),
            (
                "unix-abstract:%0",
                InvalidUnixPath("unix-abstract:%0".into()),
            ),
            ("dns:///:50051", MissingHost),
            ("dns://", MissingHost),
            ("dns:///", MissingHost),
            ("host:0", InvalidPort("0".into())),
            ("host:65536", InvalidPort("65536".into())),
            ("host:http", InvalidPort("http".into())),
            ("host:", InvalidPort("".into())),
            ("host:+1", InvalidPort("+1".into())),
            ("bad_host!:1", InvalidHost("bad_host!".into())),
            ("-bad.example:1", InvalidHost("-bad.example".into())),
            ("a..b:1", InvalidHost("a..b".into())),
            ("::1:50051", InvalidIpv6("::1:50051".into())),
            ("[::1:50051", InvalidIpv6("[::1:50051".into())),
            ("[zz::1]:1", InvalidIpv6("[zz::1]:1".into())),
            ("[::1]x", UnexpectedPart("x".into())),
            ("static:///", EmptyAddressList),
            ("static:///127.0.0.1:1,", EmptyAddressList),
            ("static:///127.0.0.1", MissingPort("127.0.0.1".into())),
            ("static:///localhost:1", InvalidAddress("localhost".into())),
            ("ipv4:[::1]:1", InvalidAddress("::1".into())),
            ("ipv6:127.0.0.1:1", InvalidAddress("127.0.0.1".into())),
            ("ipv4:", EmptyAddressList),
            (
                "dns://not-an-ip/svc:1",
                InvalidDnsServer("not-an-ip".into()),
            ),
            (
                "dns://127.0.0.1:0/svc:1",
                InvalidDnsServer("127.0.0.1:0".into()),
            ),
            ("http://host:1/path", UnexpectedPart("/path".into())),
            ("http:host:1", UnexpectedPart("host:1".into())),
            ("http://user@host:1", UnexpectedPart("@host:1".into())),
            ("http://", MissingHost),
        ];
        for (input, expected) in cases {
            assert_eq!(Target::parse(input), Err(expected.clone()), "{input:?}");
            // Every error renders to a message that names the offending part.
            let msg = expected.to_string();
            assert!(!msg.is_empty());
        }
    }

    #[test]
    fn authority_is_host_and_port() {
        assert_eq!(Target::parse("svc:1").unwrap().authority(), "svc:1");
        assert_eq!(
            Target::parse("http://[::1]:5").unwrap().authority(),
            "[::1]:5"
        );
        assert_eq!(
            Target::parse("static:///127.0.0.2:9,127.0.0.3:9")
                .unwrap()
                .authority(),
            "127.0.0.2:9"
        );
    }

    #[test]
    fn duplicates_in_a_list_collapse() {
        let t = Target::parse("static:///127.0.0.1:1,127.0.0.1:1").unwrap();
        assert_eq!(t.kind(), &TargetKind::Static(vec![sa("127.0.0.1:1")]));
    }

    /// A registered scheme's targets split into scheme, authority and endpoint (gRPC's
    /// naming), with the host and `:authority` their endpoint gives; unregistered, the same
    /// targets are unknown schemes; a built-in scheme cannot be registered over.
    #[test]
    fn custom_schemes() {
        let schemes = ["k8s", "consul", "mesh"];
        let custom = |scheme: &str, authority: &str, endpoint: &str| TargetKind::Custom {
            scheme: scheme.into(),
            authority: authority.into(),
            endpoint: endpoint.into(),
        };
        let cases = [
            // target, kind, host, authority()
            (
                "k8s:///ns/svc:8080",
                custom("k8s", "", "ns/svc:8080"),
                None,
                "localhost",
            ),
            ("K8S:ns/svc", custom("k8s", "", "ns/svc"), None, "localhost"),
            (
                "consul://127.0.0.1:8500/billing",
                custom("consul", "127.0.0.1:8500", "billing"),
                Some("billing"),
                "billing",
            ),
            (
                "mesh:///billing.internal:443",
                custom("mesh", "", "billing.internal:443"),
                Some("billing.internal"),
                "billing.internal:443",
            ),
        ];
        for (input, kind, host, authority) in cases {
            let t = Target::parse_with_schemes(input, &schemes)
                .unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(t.kind(), &kind, "{input}");
            assert_eq!(t.host(), host, "{input}");
            assert_eq!(t.authority(), authority, "{input}");
            assert!(!t.is_tls());
            // (`k8s:ns/svc`, without `//`, reads as a host and port when unregistered.)
            let scheme = input.split(':').next().unwrap().to_ascii_lowercase();
            if !input.contains("//") {
                continue;
            }
            assert_eq!(
                Target::parse(input),
                Err(TargetError::UnknownScheme(scheme)),
                "{input} unregistered"
            );
        }
        for input in ["k8s://", "k8s://authority", "k8s:", "k8s:///"] {
            assert_eq!(
                Target::parse_with_schemes(input, &schemes),
                Err(TargetError::MissingEndpoint(input.into())),
                "{input}"
            );
        }
        let dns = Target::parse_with_schemes("dns:///svc:1", &["dns"]).unwrap();
        assert!(matches!(dns.kind(), TargetKind::Dns { .. }));
        assert_eq!(dns.host(), Some("svc"));
        assert_eq!(Target::parse("static:///127.0.0.1:1").unwrap().host(), None);
    }

    /// The canonical target (gRFC A66's `grpc.target`): gRPC's default `dns:///` before a
    /// target without a scheme, gRPC's own forms as written (scheme in lower case), and
    /// tonic's `http(s)://` as the DNS target it resolves as, port included.
    #[test]
    fn canonical_targets_are_grpcs() {
        let schemes = ["k8s"];
        for (input, canonical) in [
            ("svc:50051", "dns:///svc:50051"),
            ("svc", "dns:///svc"),
            ("127.0.0.1:50051", "dns:///127.0.0.1:50051"),
            ("[::1]:50051", "dns:///[::1]:50051"),
            ("dns:///svc:50051", "dns:///svc:50051"),
            ("DNS:///svc:50051", "dns:///svc:50051"),
            ("dns:svc:50051", "dns:svc:50051"),
            ("dns://127.0.0.53/svc:50051", "dns://127.0.0.53/svc:50051"),
            (
                "static:///127.0.0.2:50051,127.0.0.3:50051",
                "static:///127.0.0.2:50051,127.0.0.3:50051",
            ),
            ("ipv4:127.0.0.1,127.0.0.2:9", "ipv4:127.0.0.1,127.0.0.2:9"),
            ("ipv6:[::1]:7", "ipv6:[::1]:7"),
            ("http://svc:8080", "dns:///svc:8080"),
            ("http://svc", "dns:///svc:80"),
            ("https://svc/", "dns:///svc:443"),
            ("https://[::1]:9", "dns:///[::1]:9"),
            ("  svc:1  ", "dns:///svc:1"),
            ("k8s:///ns/svc:8080", "k8s:///ns/svc:8080"),
            ("K8S:ns/svc", "k8s:ns/svc"),
        ] {
            let target = Target::parse_with_schemes(input, &schemes).unwrap();
            assert_eq!(target.canonical(), canonical, "{input}");
            // Canonical is a fixed point: it parses to the same addresses.
            let again = Target::parse_with_schemes(&target.canonical(), &schemes).unwrap();
            assert_eq!(again.kind(), target.kind(), "{input}");
            assert_eq!(again.canonical(), canonical, "{input}");
        }
    }
}
