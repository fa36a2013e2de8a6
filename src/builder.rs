//! [`PoolBuilder`]: every setting of a pool, with its default, validated by `build()`.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Uri};

use crate::backoff::{BackoffConfig, FastRng};
use crate::balance::Balance;
use crate::config::{Config, MAX_CONNECTIONS_PER_ENDPOINT, MAX_FRAME_SIZE_RANGE};
use crate::connector::{Connect, TcpConnector};
use crate::error::Error;
use crate::pool::Pool;
use crate::resolve::{DnsResolver, Push, Resolve, Source, SystemResolver};
use crate::subset::{Identity, Subsetting};
use crate::target::{Target, TargetKind};

/// Builds a [`Pool`]. Made by [`Pool::builder`].
///
/// Connection settings mirror `tonic::transport::Endpoint`'s and apply to every connection;
/// the pool's own settings (connections per endpoint, backoff, wait-for-ready, shutdown) follow.
#[must_use = "a builder does nothing until build() is called"]
pub struct PoolBuilder {
    target: String,
    pub(crate) config: Config,
    connector: Option<Arc<dyn Connect>>,
    resolver: Option<Arc<dyn Resolve>>,
    /// Resolvers of the user's own, by the scheme each owns (lower case).
    scheme_resolvers: Vec<(String, Arc<dyn Resolve>)>,
    /// The pushed address set, when the caller discovers the addresses.
    discovery: Option<Push>,
    runtime: Option<tokio::runtime::Handle>,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::TlsConfig>,
    /// A setter's input that could not be taken; reported by `build()`.
    invalid: Option<String>,
    /// Subsetting as set; `build()` validates it into `Config::subset`.
    subset: SubsetSettings,
}

/// The subsetting setters' values, before `build()` checks that they fit together.
#[derive(Debug, Default)]
struct SubsetSettings {
    size: Option<usize>,
    seed: Option<u64>,
    client_index: Option<u64>,
}

impl Pool {
    /// Starts building a pool for `target` (see [`Target`] for the grammar), e.g.
    /// `"static:///127.0.0.2:50051,127.0.0.3:50051"` or `"dns:///svc.ns.svc.cluster.local:50051"`.
    pub fn builder(target: impl Into<String>) -> PoolBuilder {
        PoolBuilder::new(target)
    }
}

impl PoolBuilder {
    pub(crate) fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            config: Config::default(),
            connector: None,
            resolver: None,
            scheme_resolvers: Vec::new(),
            discovery: None,
            runtime: None,
            #[cfg(feature = "tls")]
            tls: None,
            invalid: None,
            subset: SubsetSettings::default(),
        }
    }

    /// How many HTTP/2 connections to keep to each resolved address. Raise it for an address
    /// that is a load balancer (one IP, many backends: it spreads connections, not calls) or to
    /// go past a server's `MAX_CONCURRENT_STREAMS`. Must be 1..=1024.
    ///
    /// Defaults to 1, like gRPC's `round_robin`.
    pub fn connections_per_endpoint(mut self, n: usize) -> Self {
        self.config.connections_per_endpoint = n;
        self
    }

    /// Lets an endpoint open more connections, up to `max`, when every one of its connections
    /// is full — carrying as many calls as the server's `MAX_CONCURRENT_STREAMS` allows. The
    /// pool then finds the right size by itself instead of queueing calls behind the limit:
    /// a call that finds every connection full waits in the pool while the next one opens (at
    /// most 1 s, within its deadline), then goes to the first connection with room. It never
    /// closes a busy connection to shrink; connections opened by growth are closed once idle
    /// (see [`grown_idle_timeout`](Self::grown_idle_timeout)). Must be 1..=1024; a value below
    /// an endpoint's own count means no growth for it.
    ///
    /// Defaults to no growth (the count stays at `connections_per_endpoint`).
    pub fn max_connections_per_endpoint(mut self, max: usize) -> Self {
        self.config.max_connections_per_endpoint = Some(max);
        self
    }

    /// Closes a connection that growth opened (one beyond its endpoint's own count) once it has
    /// carried no call for this long, so that an endpoint shrinks back after a burst. An
    /// endpoint's own `connections_per_endpoint` connections are never retired. `None` keeps
    /// grown connections for the pool's life.
    ///
    /// Defaults to 60 s.
    pub fn grown_idle_timeout(mut self, idle: impl Into<Option<Duration>>) -> Self {
        self.config.grown_idle_timeout = idle.into();
        self
    }

    /// Overrides the connection count for one address (e.g. the one address of an external
    /// load balancer among pod addresses). It applies whenever that address is in the set,
    /// including when it appears later. Must be 1..=1024.
    ///
    /// Defaults to no overrides. Takes a `SocketAddr` or an [`EndpointAddr`](crate::EndpointAddr)
    /// (a Unix socket).
    pub fn connections_for(mut self, addr: impl Into<crate::EndpointAddr>, n: usize) -> Self {
        self.config.connections_override.insert(addr.into(), n);
        self
    }

    /// Subsetting: connects to only `k` of the resolved addresses, chosen so that across a
    /// fleet of clients the servers share the connections evenly and a change of the address
    /// set moves few of them. It is for many clients over many servers (1 000 clients of a
    /// headless Service with 500 pods): each server then holds about `clients × k / servers`
    /// connections instead of one per client, and each client spreads its calls over `k`
    /// connections, which HTTP/2 batches better than 500. It is not for a target with one
    /// address (an L4 load balancer, a ClusterIP Service): there is nothing to choose from.
    ///
    /// The subset is chosen from every resolution (or pushed set) anew: addresses that enter
    /// it connect and addresses that leave it drain, as when the resolver adds or removes
    /// them. With `k` or fewer addresses the pool uses them all. Snapshots show only the
    /// subset's endpoints, and the connection counts (`connections_per_endpoint`,
    /// `connections_for`) apply to them alone. As in gRFC A68, an address of the subset whose server fails is not
    /// swapped for another while the resolver still lists it: choose `k` so that the others
    /// can carry the calls.
    ///
    /// By default the subset comes from rendezvous hashing (gRFC A68) with a random seed per
    /// pool; [`subset_seed`](Self::subset_seed) fixes the seed, and
    /// [`subset_client_index`](Self::subset_client_index) switches to deterministic subsetting
    /// (exact balance, more churn). The README's section on subsetting compares them.
    ///
    /// Defaults to off (every address). `build()` refuses 0.
    pub fn subset_size(mut self, k: usize) -> Self {
        self.subset.size = Some(k);
        self
    }

    /// The seed of this client's subset under rendezvous hashing (gRFC A68): the subset is the
    /// `k` addresses whose hash with the seed is lowest. The hash is fixed (not `std`'s), so
    /// the same seed and the same addresses give the same subset in every process: a client
    /// whose seed outlives its restarts (say, a hash of its pod name) reconnects to the same
    /// servers.
    ///
    /// Over many clients with independent seeds, each server's connection count is
    /// Binomial(clients, k / servers): even as chance makes it, not exactly. With 1 000
    /// clients, 500 servers and `k = 20` that is 40 ± 6 connections each, and the busiest
    /// server has about 2.5 times the connections of the idlest; the spread narrows as
    /// `clients × k / servers` grows. In exchange, a change of the address set moves only the
    /// connections it must: an added address enters a subset only where it ranks among the
    /// `k` lowest, and a removed one is replaced by the next in line; no other connection
    /// moves.
    ///
    /// Defaults to a random seed per pool. Needs [`subset_size`](Self::subset_size); cannot
    /// be combined with [`subset_client_index`](Self::subset_client_index).
    pub fn subset_seed(mut self, seed: u64) -> Self {
        self.subset.seed = Some(seed);
        self
    }

    /// Deterministic subsetting (Google's SRE book, "Load Balancing in the Datacenter") for a
    /// client that knows its index in its fleet (a StatefulSet ordinal, a shard number):
    /// clients are grouped in rounds of `servers / k` (rounded down); each round shuffles the
    /// addresses with the round's number as seed, and the round's `i`-th client takes the
    /// `i`-th slice of `k`. Indexes should run densely from 0, and every client must see the
    /// same addresses and use the same `k`. The fleet's size need not be given.
    ///
    /// Within a complete round every server gets exactly one connection (the `servers mod k`
    /// left over sit the round out, by turns), so a fleet of whole rounds is exactly even:
    /// 1 000 clients, 500 servers and `k = 20` give every server 40 connections. The price is
    /// churn: a change of the address set reshuffles every round, and one of `servers / k`
    /// regroups every client. Adding or removing 10 % of those 500 servers moves about 96 %
    /// of the connections, where rendezvous hashing ([`subset_seed`](Self::subset_seed))
    /// moves about 10 %. Use it where servers change rarely and balance matters most.
    ///
    /// Defaults to off (rendezvous hashing). Needs [`subset_size`](Self::subset_size); cannot
    /// be combined with [`subset_seed`](Self::subset_seed).
    pub fn subset_client_index(mut self, index: u64) -> Self {
        self.subset.client_index = Some(index);
        self
    }

    /// How calls are spread over the Ready connections: [`Balance::RoundRobin`],
    /// [`Balance::LeastRequest`], [`Balance::PeakEwma`] or [`Balance::PickFirst`]. Each
    /// picks an address first and then one of its connections, so an address's share does
    /// not grow with its connection count. See [`Balance`] for when to use which.
    ///
    /// Defaults to [`Balance::RoundRobin`].
    pub fn balance(mut self, balance: Balance) -> Self {
        self.config.balance = balance;
        self
    }

    /// The connection backoff of every connection.
    ///
    /// Defaults to gRPC's: 1 s initial, ×1.6, ±20 % jitter, 120 s max, 20 s minimum connect
    /// timeout.
    pub fn backoff(mut self, backoff: BackoffConfig) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// Bounds each connection attempt (TCP connect, HTTP/2 handshake, server SETTINGS).
    ///
    /// Defaults to gRPC's rule: the larger of the current backoff delay and the backoff's
    /// `min_connect_timeout` (20 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = Some(timeout);
        self
    }

    /// Bounds every call, from the moment it is made until its response headers arrive,
    /// waiting for a connection included. A shorter `grpc-timeout` on the call wins. An expired
    /// call fails with `DEADLINE_EXCEEDED`.
    ///
    /// Defaults to no timeout (only the call's own deadline).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = Some(timeout);
        self
    }

    /// Sets `TCP_NODELAY` on every connection (tonic: `Endpoint::tcp_nodelay`).
    ///
    /// Defaults to `true`.
    pub fn tcp_nodelay(mut self, enabled: bool) -> Self {
        self.config.tcp.nodelay = enabled;
        self
    }

    /// Sends TCP keepalive probes after this much silence (`TCP_KEEPIDLE`; tonic:
    /// `Endpoint::tcp_keepalive`).
    ///
    /// Like every TCP setting it reaches custom connectors too, in
    /// [`Destination::tcp`](crate::connector::Destination::tcp).
    ///
    /// Defaults to off.
    pub fn tcp_keepalive(mut self, time: impl Into<Option<Duration>>) -> Self {
        self.config.tcp.keepalive_time = time.into();
        self
    }

    /// The time between two TCP keepalive probes that go unanswered (`TCP_KEEPINTVL`; tonic:
    /// `Endpoint::tcp_keepalive_interval`). Setting it turns TCP keepalive on.
    ///
    /// Defaults to the operating system's (75 s on Linux).
    pub fn tcp_keepalive_interval(mut self, interval: impl Into<Option<Duration>>) -> Self {
        self.config.tcp.keepalive_interval = interval.into();
        self
    }

    /// How many unanswered TCP keepalive probes drop the connection (`TCP_KEEPCNT`; tonic:
    /// `Endpoint::tcp_keepalive_retries`). Setting it turns TCP keepalive on.
    ///
    /// Defaults to the operating system's (9 on Linux).
    pub fn tcp_keepalive_retries(mut self, retries: impl Into<Option<u32>>) -> Self {
        self.config.tcp.keepalive_retries = retries.into();
        self
    }

    /// The local IP address every connection binds before it connects (tonic:
    /// `Endpoint::local_address`), e.g. to leave through one interface. Addresses of the
    /// other IP family are connected to without binding.
    ///
    /// Defaults to none (the operating system chooses).
    pub fn local_address(mut self, addr: impl Into<Option<IpAddr>>) -> Self {
        self.config.tcp.local_address = addr.into();
        self
    }

    /// Sends an HTTP/2 PING this often (gRFC A8 `keepalive_time`); a connection whose PING
    /// is not acked within [`keep_alive_timeout`](Self::keep_alive_timeout) is closed and
    /// replaced. gRPC recommends at least 10 s; servers may answer eager pings with GOAWAY.
    ///
    /// Defaults to off.
    pub fn http2_keep_alive_interval(mut self, interval: Duration) -> Self {
        self.config.keep_alive_interval = Some(interval);
        self
    }

    /// How long to wait for a PING ack before the connection is declared dead.
    ///
    /// Defaults to 20 s.
    pub fn keep_alive_timeout(mut self, timeout: Duration) -> Self {
        self.config.keep_alive_timeout = timeout;
        self
    }

    /// Whether to send keepalive PINGs on connections without calls.
    ///
    /// Defaults to `false`.
    pub fn keep_alive_while_idle(mut self, enabled: bool) -> Self {
        self.config.keep_alive_while_idle = enabled;
        self
    }

    /// HTTP/2 initial stream window size, in bytes: how much a server may send on one call
    /// before the pool reads it.
    ///
    /// Defaults to 2 MiB, as a tonic `Channel` (hyper's default).
    pub fn initial_stream_window_size(mut self, size: impl Into<Option<u32>>) -> Self {
        self.config.initial_stream_window_size = size.into();
        self
    }

    /// HTTP/2 initial connection window size, in bytes: the same, for all calls on one
    /// connection together.
    ///
    /// Defaults to 5 MiB, as a tonic `Channel` (hyper's default).
    pub fn initial_connection_window_size(mut self, size: impl Into<Option<u32>>) -> Self {
        self.config.initial_connection_window_size = size.into();
        self
    }

    /// Grows the HTTP/2 windows with the measured bandwidth-delay product (tonic:
    /// `Endpoint::http2_adaptive_window`), for servers far away: the pool times a PING
    /// against the bytes received meanwhile, and when a window's worth arrives within one
    /// round trip it doubles the windows (up to 16 MiB), as hyper does. The windows then
    /// start at HTTP/2's 64 KiB, overriding
    /// [`initial_stream_window_size`](Self::initial_stream_window_size) and
    /// [`initial_connection_window_size`](Self::initial_connection_window_size). Its PINGs
    /// are only sent while data arrives, and share the one PING in flight with keepalive.
    ///
    /// Defaults to `false`.
    pub fn http2_adaptive_window(mut self, enabled: bool) -> Self {
        self.config.adaptive_window = enabled;
        self
    }

    /// The largest response header list the pool accepts, announced to servers as
    /// `SETTINGS_MAX_HEADER_LIST_SIZE` (tonic: `Endpoint::http2_max_header_list_size`). A
    /// response with larger headers fails its call. Must be greater than zero.
    ///
    /// Defaults to 16 KiB, as a tonic `Channel`.
    pub fn http2_max_header_list_size(mut self, size: u32) -> Self {
        self.config.max_header_list_size = size;
        self
    }

    /// The largest frame payload the pool accepts, announced as `SETTINGS_MAX_FRAME_SIZE`
    /// (hyper: `http2::Builder::max_frame_size`; tonic's `Endpoint` does not offer it). Must
    /// be 16 384..=16 777 215 (RFC 9113 §6.5.2).
    ///
    /// Defaults to 16 KiB (HTTP/2's default).
    pub fn http2_max_frame_size(mut self, size: impl Into<Option<u32>>) -> Self {
        self.config.max_frame_size = size.into();
        self
    }

    /// The `user-agent` of every call (followed by `tonic-pool/VERSION`).
    ///
    /// Defaults to `tonic-pool/VERSION` alone.
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        // An invalid header value becomes an error from build(), not a panic here.
        let user_agent = user_agent.into();
        match HeaderValue::from_str(&user_agent) {
            Ok(value) => self.config.user_agent = Some(value),
            Err(_) => {
                self.invalid = Some(format!(
                    "user_agent {user_agent:?} is not a valid header value"
                ))
            }
        }
        self
    }

    /// The scheme and authority every request carries (`:scheme`, `:authority`), instead of
    /// the target's `host:port`. Use it when the servers route by a virtual host name.
    ///
    /// Defaults to the target's `http(s)://host:port`.
    pub fn origin(mut self, origin: Uri) -> Self {
        self.config.origin = Some(origin);
        self
    }

    /// Whether calls wait for a Ready connection when every connection is in
    /// TransientFailure (gRPC's wait-for-ready), instead of failing fast with `UNAVAILABLE`.
    /// A call can choose for itself with the [`WaitForReady`](crate::WaitForReady) extension.
    ///
    /// Defaults to `false` (fail fast), as in gRPC.
    pub fn wait_for_ready(mut self, enabled: bool) -> Self {
        self.config.wait_for_ready = enabled;
        self
    }

    /// How long [`Pool::close`] lets calls in flight finish before it closes the connections.
    ///
    /// Defaults to 30 s.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.config.close_timeout = timeout;
        self
    }

    /// How long a connection to an address that left the address set may keep serving its
    /// calls in flight before it is closed.
    ///
    /// Defaults to 30 s.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// Whether the pool stays Idle until the first call or [`Pool::connect`], as a gRPC
    /// channel does, instead of connecting as soon as it is built.
    ///
    /// Defaults to `false` (connect at once).
    pub fn connect_lazily(mut self, lazily: bool) -> Self {
        self.config.connect_lazily = lazily;
        self
    }

    /// Idle mode (grpc-go `WithIdleTimeout`): after this long without a call (none in
    /// flight, none started), the pool goes Idle and closes its connections gracefully
    /// (GOAWAY; no call fails). The pool looks once per timeout, so it goes Idle between one
    /// and two timeouts after its last call, as grown connections do. It stops resolving
    /// while Idle. The next call makes it connect again — it waits for a
    /// connection as a call does while the pool is Connecting, it does not fail because the
    /// pool was Idle — and the pool is Ready again. `None` keeps connections open for the
    /// pool's life. tonic's `Endpoint` has no such setting (`connect_lazy` only starts Idle);
    /// together with [`connect_lazily`](Self::connect_lazily) the pool connects only while it
    /// is used.
    ///
    /// Defaults to `None`.
    pub fn idle_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.config.idle_timeout = timeout.into();
        self
    }

    /// Bounds on how long a DNS answer is trusted: the answer's TTL, clamped to
    /// `floor..=ceiling`, sets when the pool resolves again. The floor keeps a TTL of 0 from
    /// turning into a query storm; the ceiling makes sure pods that appear behind a long TTL
    /// are found within it. CoreDNS serves headless Services with a 5 s TTL, hence the floor.
    /// Answers without a TTL are trusted for `ceiling`.
    ///
    /// Defaults to 5 s and 30 s.
    pub fn resolve_ttl_bounds(mut self, floor: Duration, ceiling: Duration) -> Self {
        self.config.resolve_ttl_floor = floor;
        self.config.resolve_ttl_ceiling = ceiling;
        self
    }

    /// The least time between two resolutions when connections ask for one early (a
    /// connection was lost or failed). gRPC uses 30 s; pods recycle faster than that.
    ///
    /// Defaults to 5 s.
    pub fn min_reresolve_interval(mut self, interval: Duration) -> Self {
        self.config.min_reresolve_interval = interval;
        self
    }

    /// Enables gRPC client-side health checking (gRFC A17): each connection watches its
    /// server's health with `grpc.health.v1.Health/Watch` for `service_name` (`""` asks for
    /// the whole server), on the connection itself, and takes calls only while the server
    /// says `SERVING`. A server that says otherwise keeps its connections, whose calls in
    /// flight finish, but gets no new call from the moment its answer arrives; its
    /// connections show as TransientFailure, with the status as their reason. A new
    /// connection is Connecting until the first answer. A server without the health service
    /// (`UNIMPLEMENTED`) is treated as serving. A failed Watch is retried with the pool's
    /// backoff. The crate docs' [health checking](crate#health-checking-feature-health)
    /// section has the whole table.
    ///
    /// Defaults to off. Needs the cargo feature `health`.
    #[cfg(feature = "health")]
    pub fn health_check(mut self, service_name: impl Into<String>) -> Self {
        self.config.health_check = Some(service_name.into());
        self
    }

    /// Outlier detection (gRFC A50): every `interval`, an address whose calls failed much
    /// more than its peers' is ejected — it takes no new call, its connections stay open —
    /// for `base_ejection_time` times the number of its ejections, then comes back. The
    /// [`OutlierDetection`](crate::OutlierDetection) docs have the settings and A50's
    /// defaults; the crate docs' [outlier detection](crate#outlier-detection) section says
    /// which calls count as failures and what happens when every address is an outlier.
    ///
    /// Defaults to off. `build()` refuses a zero interval and percentages above 100.
    pub fn outlier_detection(mut self, detection: crate::OutlierDetection) -> Self {
        self.config.outlier_detection = Some(detection);
        self
    }

    /// The connector that opens each connection's byte stream. With the `tls` feature,
    /// `tls(..)` runs TLS over it.
    ///
    /// A connector gets the TCP settings above with every destination
    /// ([`Destination::tcp`](crate::connector::Destination::tcp)) and applies them when it
    /// opens TCP (see [`TcpSettings::connect`](crate::connector::TcpSettings::connect)).
    ///
    /// Defaults to [`TcpConnector`].
    pub fn connector(mut self, connector: impl Connect) -> Self {
        self.connector = Some(Arc::new(connector));
        self
    }

    /// Speaks TLS (rustls) on every connection, with these settings: certificates are checked
    /// against the target's host name (or [`TlsConfig::server_name`](crate::tls::TlsConfig::server_name)),
    /// ALPN `h2` is required, and the handshake counts against the connect timeout. Works
    /// with every target form (`dns:///`, `static:///`, `ipv4:`, …) and wraps the
    /// [`connector`](Self::connector), so TLS runs over any byte stream. Requests then carry
    /// the `https` scheme. See the [`tls`](crate::tls) module.
    ///
    /// Defaults to plaintext, except for `https://` targets, which use
    /// [`TlsConfig::new()`](crate::tls::TlsConfig::new) (the roots of the enabled roots
    /// features) unless the connector speaks TLS itself.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, config: crate::tls::TlsConfig) -> Self {
        self.tls = Some(config);
        self
    }

    /// The resolver that turns the target into addresses.
    ///
    /// Defaults to none for literal addresses, and for names to [`DnsResolver`] (hickory,
    /// the system's DNS configuration, or the server named in `dns://server/host:port`),
    /// falling back to [`SystemResolver`] if the system configuration cannot be read.
    pub fn resolver(mut self, resolver: impl Resolve) -> Self {
        self.resolver = Some(Arc::new(resolver));
        self
    }

    /// Registers a resolver of your own for targets of its own scheme, e.g. `"k8s"` for
    /// `k8s:///ns/svc:8080` or `"consul"` for `consul:///billing`: such a target then parses
    /// into [`TargetKind::Custom`](crate::target::TargetKind::Custom) (gRPC's
    /// `scheme://authority/endpoint`) and this resolver resolves it. Register as many schemes
    /// as you like; a target whose scheme nobody registered stays an unknown-scheme error.
    /// The built-in schemes (`dns`, `static`, `ipv4`, `ipv6`, `http`, `https`, and gRPC's
    /// `unix`, `unix-abstract`) cannot be taken over: [`resolver`](Self::resolver) replaces
    /// the resolver of the first six.
    ///
    /// What such a target carries as `:authority`, and the host name a TLS connector
    /// verifies, come from its endpoint when that is a `host[:port]` (see
    /// [`Target::host`]); [`origin`](Self::origin) sets them otherwise.
    ///
    /// ```no_run
    /// use tonic_pool::resolve::{BoxFuture, Resolution, Resolve, ResolveError};
    /// use tonic_pool::target::{Target, TargetKind};
    ///
    /// /// Resolves `k8s:///namespace/service:port` (from an EndpointSlice watch, elided).
    /// #[derive(Debug)]
    /// struct K8s;
    ///
    /// impl Resolve for K8s {
    ///     fn resolve(&self, target: &Target) -> BoxFuture<'static, Result<Resolution, ResolveError>> {
    ///         let TargetKind::Custom { endpoint, .. } = target.kind() else {
    ///             return Box::pin(async { Err(ResolveError::new("not a k8s target")) });
    ///         };
    ///         let endpoint = endpoint.clone(); // "billing/api:50051"
    ///         Box::pin(async move {
    ///             let addresses: Vec<std::net::SocketAddr> = Vec::new(); // look `endpoint` up
    ///             Ok(Resolution::new(addresses, None))
    ///         })
    ///     }
    /// }
    ///
    /// # fn run() -> Result<(), tonic_pool::Error> {
    /// let pool = tonic_pool::Pool::builder("k8s:///billing/api:50051")
    ///     .resolver_for_scheme("k8s", K8s)
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    ///
    /// Defaults to no schemes of your own.
    pub fn resolver_for_scheme(mut self, scheme: &str, resolver: impl Resolve) -> Self {
        let valid = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !valid {
            self.invalid = Some(format!(
                "resolver_for_scheme: {scheme:?} is not a URI scheme (a letter, then letters, \
                 digits, '+', '-' or '.')"
            ));
        } else if crate::target::BUILT_IN_SCHEMES
            .iter()
            .any(|b| b.eq_ignore_ascii_case(scheme))
        {
            self.invalid = Some(format!(
                "resolver_for_scheme: {scheme:?} is a scheme of the target syntax's own (use \
                 .resolver(…) to replace the resolver of dns, static, ipv4, ipv6, http, https)"
            ));
        } else {
            let scheme = scheme.to_ascii_lowercase();
            self.scheme_resolvers.retain(|(s, _)| *s != scheme);
            self.scheme_resolvers.push((scheme, Arc::new(resolver)));
        }
        self
    }

    /// Takes the pool's addresses from `addresses`, a set the caller pushes to as its own
    /// discovery sees servers come and go, instead of resolving the target; see
    /// [`Push`](crate::resolve::Push). The target still names the service: its host is the
    /// `:authority` and the TLS host name, but it is never resolved (the addresses of a
    /// `static:///` target are not used either). Cannot be combined with a resolver.
    ///
    /// Defaults to resolving the target.
    pub fn discovery(mut self, addresses: Push) -> Self {
        self.discovery = Some(addresses);
        self
    }

    /// The tokio runtime the pool's background tasks run on.
    ///
    /// Defaults to the runtime `build()` is called in.
    pub fn runtime(mut self, handle: tokio::runtime::Handle) -> Self {
        self.runtime = Some(handle);
        self
    }

    /// Validates the settings, starts the pool's worker and returns the pool.
    ///
    /// It does not wait for connections: use [`Pool::wait_ready`] for that. Errors (never
    /// panics) on a malformed target, an out-of-range setting, a TLS setting that cannot be
    /// used (malformed PEM, no trusted root), or when there is no runtime.
    pub fn build(mut self) -> Result<Pool, Error> {
        let schemes: Vec<&str> = self
            .scheme_resolvers
            .iter()
            .map(|(s, _)| s.as_str())
            .collect();
        let target =
            Target::parse_with_schemes(&self.target, &schemes).map_err(Error::invalid_target)?;
        let has_schemes = !schemes.is_empty();
        if let Some(invalid) = self.invalid {
            return Err(Error::invalid_config(invalid));
        }
        if self.discovery.is_some() && (self.resolver.is_some() || has_schemes) {
            return Err(Error::invalid_config(
                "discovery(…) and a resolver are both set: a pool's addresses come from one \
                 of them",
            ));
        }
        validate(&self.config)?;
        self.config.subset = subsetting(&self.subset)?;
        let connector: Arc<dyn Connect> = match self.connector.take() {
            Some(c) => c,
            None => Arc::new(TcpConnector::new()),
        };
        let connector = self.secure(&target, connector)?;
        // A custom target goes to the resolver of its scheme (parsing let it through only
        // because one is registered).
        let scheme_resolver = match target.kind() {
            TargetKind::Custom { scheme, .. } => self
                .scheme_resolvers
                .iter()
                .find(|(s, _)| s == scheme)
                .map(|(_, r)| r.clone()),
            _ => None,
        };
        // A Unix socket is one fixed address: no resolver (not even one given) sees it.
        let unix = match target.kind() {
            TargetKind::Unix(addr) => Some(addr.clone()),
            _ => None,
        };
        let addresses = match (self.discovery, unix, scheme_resolver, self.resolver) {
            (Some(push), _, _, _) => Source::Push(push),
            (None, Some(addr), _, _) => Source::Fixed(addr),
            (None, None, Some(r), _) | (None, None, None, Some(r)) => Source::Resolver(r),
            (None, None, None, None) => Source::Resolver(default_resolver(&target)),
        };
        let runtime = match self.runtime {
            Some(handle) => handle,
            None => tokio::runtime::Handle::try_current().map_err(|_| Error::no_runtime())?,
        };
        Ok(Pool::start(
            target,
            self.config,
            connector,
            addresses,
            runtime,
        ))
    }
}

impl PoolBuilder {
    /// Puts TLS around `connector` when [`tls`](Self::tls) was set, or when the target is
    /// `https://` and the connector does not speak TLS itself; requests then carry the
    /// `https` scheme (and a server name override as their authority) unless an origin was
    /// set.
    #[cfg(feature = "tls")]
    fn secure(
        &mut self,
        target: &Target,
        connector: Arc<dyn Connect>,
    ) -> Result<Arc<dyn Connect>, Error> {
        let tls = match self.tls.take() {
            Some(_) if connector.supports_tls() => {
                return Err(Error::invalid_config(
                    "PoolBuilder::tls was set, but the connector speaks TLS itself \
                     (Connect::supports_tls): use one or the other",
                ))
            }
            Some(tls) => tls,
            None if target.is_tls() && !connector.supports_tls() => crate::tls::TlsConfig::new(),
            None => return Ok(connector),
        };
        if self.config.origin.is_none() {
            let authority = match tls.server_name_override() {
                Some(name) => {
                    let name = name.to_str();
                    let host = if name.contains(':') {
                        format!("[{name}]")
                    } else {
                        name.into_owned()
                    };
                    // The target's port: the last `:port` of its authority.
                    match target.authority().rsplit_once(':') {
                        Some((_, port)) => format!("{host}:{port}"),
                        None => host,
                    }
                }
                None => target.authority(),
            };
            let origin = Uri::builder()
                .scheme("https")
                .authority(authority.as_str())
                .path_and_query("/")
                .build()
                .map_err(|e| {
                    Error::invalid_config(format!(
                        "tls: {authority:?} does not make a valid request authority"
                    ))
                    .with_source(e)
                })?;
            self.config.origin = Some(origin);
        }
        Ok(Arc::new(crate::tls::TlsConnector::new(tls, connector)?))
    }

    /// Without the `tls` feature, only a connector that speaks TLS itself can take an
    /// `https://` target.
    #[cfg(not(feature = "tls"))]
    fn secure(
        &mut self,
        target: &Target,
        connector: Arc<dyn Connect>,
    ) -> Result<Arc<dyn Connect>, Error> {
        if target.is_tls() && !connector.supports_tls() {
            return Err(Error::invalid_config(format!(
                "target {target} asks for TLS: enable the tonic-pool feature `tls` \
                 (or give the builder a connector that speaks TLS)"
            )));
        }
        Ok(connector)
    }
}

/// Literal addresses need no resolver; names go to DNS through hickory (its cache off, the
/// pool decides when to ask). If the system's DNS configuration cannot be read, the operating
/// system's resolver (`getaddrinfo`) is used instead, without TTLs.
fn default_resolver(target: &Target) -> Arc<dyn Resolve> {
    if crate::resolve::StaticResolver::literal(target).is_some() {
        return Arc::new(crate::resolve::StaticResolver::new());
    }
    if let TargetKind::Dns {
        server: Some(server),
        ..
    } = target.kind()
    {
        return Arc::new(DnsResolver::with_server(*server));
    }
    match DnsResolver::system() {
        Ok(dns) => Arc::new(dns),
        Err(e) => {
            tracing::warn!(%target, error = %e, "system DNS configuration unreadable; using getaddrinfo");
            Arc::new(SystemResolver::new())
        }
    }
}

/// The subsetting the settings ask for, if any; an error names what does not fit.
fn subsetting(settings: &SubsetSettings) -> Result<Option<Subsetting>, Error> {
    let identity = match (settings.seed, settings.client_index) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid_config(
                "subset_seed(…) and subset_client_index(…) are both set: a pool's subset \
                 comes from rendezvous hashing (a seed) or from deterministic subsetting (an \
                 index), not both",
            ))
        }
        (None, Some(index)) => Identity::ClientIndex(index),
        (Some(seed), None) => Identity::Seed(seed),
        // gRFC A68: a random seed per client.
        (None, None) => Identity::Seed(FastRng::random_seed()),
    };
    match settings.size {
        Some(0) => Err(Error::invalid_config(
            "subset_size must be at least 1, got 0 (leave it unset to use every address)",
        )),
        Some(size) => Ok(Some(Subsetting { size, identity })),
        None if settings.seed.is_some() || settings.client_index.is_some() => {
            Err(Error::invalid_config(
                "subset_seed(…) or subset_client_index(…) is set without subset_size(…): \
                 set how many addresses the subset holds",
            ))
        }
        None => Ok(None),
    }
}

fn validate(config: &Config) -> Result<(), Error> {
    let range = 1..=MAX_CONNECTIONS_PER_ENDPOINT;
    if !range.contains(&config.connections_per_endpoint) {
        return Err(Error::invalid_config(format!(
            "connections_per_endpoint must be 1..={MAX_CONNECTIONS_PER_ENDPOINT}, got {}",
            config.connections_per_endpoint
        )));
    }
    if let Some(max) = config.max_connections_per_endpoint {
        if !range.contains(&max) {
            return Err(Error::invalid_config(format!(
                "max_connections_per_endpoint must be 1..={MAX_CONNECTIONS_PER_ENDPOINT}, got {max}"
            )));
        }
    }
    for (addr, n) in &config.connections_override {
        if !range.contains(n) {
            return Err(Error::invalid_config(format!(
                "connections_for({addr}) must be 1..={MAX_CONNECTIONS_PER_ENDPOINT}, got {n}"
            )));
        }
    }
    config.backoff.validate().map_err(Error::invalid_config)?;
    let non_zero = [
        ("connect_timeout", config.connect_timeout),
        ("timeout", config.timeout),
        ("http2_keep_alive_interval", config.keep_alive_interval),
        ("keep_alive_timeout", Some(config.keep_alive_timeout)),
        ("grown_idle_timeout", config.grown_idle_timeout),
        ("idle_timeout", config.idle_timeout),
        ("tcp_keepalive", config.tcp.keepalive_time),
        ("tcp_keepalive_interval", config.tcp.keepalive_interval),
    ];
    for (name, value) in non_zero {
        if value == Some(Duration::ZERO) {
            return Err(Error::invalid_config(format!(
                "{name} must be greater than zero"
            )));
        }
    }
    if let Some(size) = config.max_frame_size {
        if !MAX_FRAME_SIZE_RANGE.contains(&size) {
            return Err(Error::invalid_config(format!(
                "http2_max_frame_size must be {}..={} (RFC 9113 §6.5.2), got {size}",
                MAX_FRAME_SIZE_RANGE.start(),
                MAX_FRAME_SIZE_RANGE.end()
            )));
        }
    }
    if config.max_header_list_size == 0 {
        return Err(Error::invalid_config(
            "http2_max_header_list_size must be greater than zero",
        ));
    }
    if config.tcp.keepalive_retries == Some(0) {
        return Err(Error::invalid_config(
            "tcp_keepalive_retries must be greater than zero",
        ));
    }
    if config.resolve_ttl_floor.is_zero() || config.resolve_ttl_floor > config.resolve_ttl_ceiling {
        return Err(Error::invalid_config(format!(
            "resolve_ttl_bounds: need 0 < floor <= ceiling, got {:?}..={:?}",
            config.resolve_ttl_floor, config.resolve_ttl_ceiling
        )));
    }
    if let Some(detection) = &config.outlier_detection {
        detection.validate().map_err(Error::invalid_config)?;
    }
    if let Some(origin) = &config.origin {
        if origin.scheme().is_none() || origin.authority().is_none() {
            return Err(Error::invalid_config(format!(
                "origin {origin} needs a scheme and an authority"
            )));
        }
    }
    Ok(())
}

impl fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("PoolBuilder");
        f.field("target", &self.target)
            .field("config", &self.config)
            .field("connector", &self.connector)
            .field("resolver", &self.resolver)
            .field("scheme_resolvers", &self.scheme_resolvers)
            .field("discovery", &self.discovery)
            .field("subset", &self.subset);
        #[cfg(feature = "tls")]
        f.field("tls", &self.tls);
        f.finish()
    }
}

#[cfg(all(test, feature = "tls"))]
mod tls_tests {
    use super::*;
    use crate::connector::{BoxedIo, Destination};
    use crate::tls::TlsConfig;
    use crate::BoxFuture;

    fn trusted() -> TlsConfig {
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).expect("cert");
        TlsConfig::new()
            .feature_roots(false)
            .ca_certificate(ca.cert.pem())
    }

    /// The origin requests carry after `secure()` (the `:scheme` and `:authority`).
    fn origin(target: &str, builder: PoolBuilder) -> String {
        let mut builder = builder;
        let target = Target::parse(target).unwrap();
        builder
            .secure(&target, Arc::new(TcpConnector::default()))
            .expect("TLS settings");
        builder.config.origin.expect("an origin").to_string()
    }

    /// Over TLS requests carry `https` with the target's authority; a server name override
    /// becomes the authority with the target's port (as grpc-go takes it from the
    /// credentials); an origin set by the user wins.
    #[test]
    fn tls_sets_the_https_origin() {
        let target = "static:///127.0.0.2:8443,127.0.0.3:8443";
        let with = |tls: TlsConfig| Pool::builder(target).tls(tls);
        assert_eq!(origin(target, with(trusted())), "https://127.0.0.2:8443/");
        assert_eq!(
            origin(target, with(trusted().server_name("api.test"))),
            "https://api.test:8443/"
        );
        let dns = "dns:///svc.test:50051";
        assert_eq!(
            origin(dns, Pool::builder(dns).tls(trusted())),
            "https://svc.test:50051/"
        );
        let user =
            with(trusted().server_name("api.test")).origin("http://vhost:1".parse().unwrap());
        assert_eq!(origin(target, user), "http://vhost:1/");
    }

    #[derive(Debug)]
    struct SpeaksTls;

    impl Connect for SpeaksTls {
        fn connect(&self, _: &Destination) -> BoxFuture<'static, std::io::Result<BoxedIo>> {
            Box::pin(std::future::ready(Err(
                std::io::ErrorKind::Unsupported.into()
            )))
        }

        fn supports_tls(&self) -> bool {
            true
        }
    }

    /// `.tls(..)` around a connector that speaks TLS itself would be TLS twice: an error; an
    /// `https://` target with such a connector is left to it.
    #[test]
    fn tls_around_a_tls_connector_is_an_error() {
        let target = Target::parse("https://svc.test").unwrap();
        let err = Pool::builder("https://svc.test")
            .tls(trusted())
            .secure(&target, Arc::new(SpeaksTls))
            .unwrap_err();
        assert!(err.to_string().contains("speaks TLS itself"), "{err}");
        let mut builder = Pool::builder("https://svc.test");
        let connector = builder.secure(&target, Arc::new(SpeaksTls)).unwrap();
        assert!(format!("{connector:?}").contains("SpeaksTls"));
        assert!(
            builder.config.origin.is_none(),
            "the target's own https origin"
        );
    }
}
