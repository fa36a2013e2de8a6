//! [`PoolBuilder`]: every setting of a pool, with its default, validated by `build()`.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Uri};

use crate::backoff::BackoffConfig;
use crate::balance::Balance;
use crate::config::{Config, MAX_CONNECTIONS_PER_ENDPOINT};
use crate::connector::{Connect, TcpConnector};
use crate::error::Error;
use crate::pool::Pool;
use crate::resolve::{DnsResolver, Resolve, SystemResolver};
use crate::target::Target;

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
    runtime: Option<tokio::runtime::Handle>,
    /// A setter's input that could not be taken; reported by `build()`.
    invalid: Option<String>,
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
            runtime: None,
            invalid: None,
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
    /// Defaults to no overrides.
    pub fn connections_for(mut self, addr: SocketAddr, n: usize) -> Self {
        self.config.connections_override.insert(addr, n);
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

    /// Sets `TCP_NODELAY` on every connection.
    ///
    /// Defaults to `true`.
    pub fn tcp_nodelay(mut self, enabled: bool) -> Self {
        self.config.tcp_nodelay = enabled;
        self
    }

    /// Sends TCP keepalive probes after this much silence.
    ///
    /// Defaults to off.
    pub fn tcp_keepalive(mut self, time: Option<Duration>) -> Self {
        self.config.tcp_keepalive = time;
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

    /// The connector that opens each connection's byte stream (TLS plugs in here).
    ///
    /// Defaults to [`TcpConnector`] with the TCP settings above.
    pub fn connector(mut self, connector: impl Connect) -> Self {
        self.connector = Some(Arc::new(connector));
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
    /// panics) on a malformed target, an out-of-range setting, or when there is no runtime.
    pub fn build(self) -> Result<Pool, Error> {
        let target = Target::parse(&self.target).map_err(Error::invalid_target)?;
        if let Some(invalid) = self.invalid {
            return Err(Error::invalid_config(invalid));
        }
        validate(&self.config)?;
        let connector: Arc<dyn Connect> = match self.connector {
            Some(c) => c,
            None => Arc::new(TcpConnector::new(
                self.config.tcp_nodelay,
                self.config.tcp_keepalive,
            )),
        };
        if target.is_tls() && !connector.supports_tls() {
            return Err(Error::invalid_config(format!(
                "target {target} asks for TLS, but the connector does not speak TLS \
                 (give the builder a TLS connector)"
            )));
        }
        let resolver: Arc<dyn Resolve> = match self.resolver {
            Some(r) => r,
            None => default_resolver(&target),
        };
        let runtime = match self.runtime {
            Some(handle) => handle,
            None => tokio::runtime::Handle::try_current().map_err(|_| Error::no_runtime())?,
        };
        Ok(Pool::start(
            target,
            self.config,
            connector,
            resolver,
            runtime,
        ))
    }
}

/// Literal addresses need no resolver; names go to DNS through hickory (its cache off, the
/// pool decides when to ask). If the system's DNS configuration cannot be read, the operating
/// system's resolver (`getaddrinfo`) is used instead, without TTLs.
fn default_resolver(target: &Target) -> Arc<dyn Resolve> {
    if crate::resolve::StaticResolver::literal(target).is_some() {
        return Arc::new(crate::resolve::StaticResolver::new());
    }
    if let crate::target::TargetKind::Dns {
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
    ];
    for (name, value) in non_zero {
        if value == Some(Duration::ZERO) {
            return Err(Error::invalid_config(format!(
                "{name} must be greater than zero"
            )));
        }
    }
    if config.resolve_ttl_floor.is_zero() || config.resolve_ttl_floor > config.resolve_ttl_ceiling {
        return Err(Error::invalid_config(format!(
            "resolve_ttl_bounds: need 0 < floor <= ceiling, got {:?}..={:?}",
            config.resolve_ttl_floor, config.resolve_ttl_ceiling
        )));
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
        f.debug_struct("PoolBuilder")
            .field("target", &self.target)
            .field("config", &self.config)
            .field("connector", &self.connector)
            .field("resolver", &self.resolver)
            .finish()
    }
}
