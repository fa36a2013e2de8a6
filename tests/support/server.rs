//! [`TestServer`]: a real tonic `echo.Echo` server for tests.
//!
//! Each server runs on its own OS thread with its own current-thread tokio
//! runtime, so it shares no tasks with the test's runtime, and a hard
//! [`TestServer::stop`] drops that runtime: every connection is closed at once
//! and in-flight RPCs break, as when a real server process dies.
//!
//! Counters survive [`TestServer::restart`], so a test can see the clients
//! reconnect. Waiting is event driven ([`tokio::sync::watch`]) and always
//! bounded by a timeout. The `wait_for_*` timeouts use tokio's clock: don't
//! call them from a test whose time is paused, where the clock jumps ahead
//! while the test only waits on this server's thread.
//!
//! With [`ServerOptions::health`] the server also serves gRPC's health service
//! (`grpc.health.v1.Health`, tonic-health's), whose statuses
//! [`TestServer::set_health`] sets; they too survive a restart.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Status, Streaming};

use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};
pub use tonic_health::ServingStatus;

use super::echo::echo_server::{Echo, EchoServer};
use super::echo::{EchoReply, EchoRequest, StreamRequest};

/// The header the server copies each request's `:authority` into (see `authority?`).
const AUTHORITY_HEADER: &str = "x-test-authority";
/// Backlog of the listening socket.
const LISTEN_BACKLOG: u32 = 1024;
/// Buffer (in replies) between a streaming handler and its response stream.
const STREAM_BUFFER: usize = 16;

/// `127.0.0.<last>:0`: a loopback address whose port the OS picks on bind.
pub fn loopback(last: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0)
}

/// Settings for [`TestServer::start_with`]; `Default` is a plain tonic server.
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    /// Name put in every reply's `server` field; empty means the bound address.
    pub name: String,
    /// tonic `Server::max_connection_age`: GOAWAY each connection after this age.
    pub max_connection_age: Option<Duration>,
    /// tonic `Server::max_connection_age_grace`: force-close this long after that GOAWAY.
    pub max_connection_age_grace: Option<Duration>,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` advertised per connection.
    pub max_concurrent_streams: Option<u32>,
    /// Interval of server-sent HTTP/2 keepalive PINGs (`None`: no pings).
    pub http2_keepalive_interval: Option<Duration>,
    /// How long the server waits for a PING ack before closing the connection.
    pub http2_keepalive_timeout: Option<Duration>,
    /// A response header (lowercase ASCII) that every successful unary reply carries, with the
    /// server's name as its value: how a client behind a load balancer sees which backend
    /// answered (`None`: no such header).
    pub name_header: Option<String>,
    /// Serve over TLS with these settings (see [`super::tls`]); `None`: plaintext.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Serve gRPC's health service too (the whole server, `""`, starts SERVING).
    pub health: bool,
    /// Added to every unary call's own `sleep_ms`: a server slower than its peers.
    pub unary_delay: Duration,
    /// Every unary call fails with `UNAVAILABLE` (its transport stays fine): a server whose
    /// application is broken, for outlier detection.
    pub fail_unary: bool,
}

/// Counters shared between a [`TestServer`] handle and its server thread(s).
#[derive(Debug)]
struct Stats {
    /// TCP connections accepted so far.
    accepted: watch::Sender<u64>,
    /// TCP connections currently open.
    open: watch::Sender<u64>,
    /// RPCs started so far.
    requests: watch::Sender<u64>,
    /// RPCs started so far, per client peer address.
    by_peer: Mutex<HashMap<SocketAddr, u64>>,
    /// Unary RPCs running right now.
    unary_in_flight: watch::Sender<u64>,
    /// The most unary RPCs that ever ran at once.
    max_unary_in_flight: watch::Sender<u64>,
    /// The keys of `unavailable-once:KEY` requests already failed once.
    failed_once: Mutex<std::collections::HashSet<String>>,
}

impl Stats {
    fn new() -> Self {
        Self {
            accepted: watch::Sender::new(0),
            open: watch::Sender::new(0),
            requests: watch::Sender::new(0),
            by_peer: Mutex::new(HashMap::new()),
            unary_in_flight: watch::Sender::new(0),
            max_unary_in_flight: watch::Sender::new(0),
            failed_once: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Whether this is the first request with `key` (and remembers it).
    fn first_time(&self, key: &str) -> bool {
        self.failed_once
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_owned())
    }

    fn by_peer(&self) -> MutexGuard<'_, HashMap<SocketAddr, u64>> {
        // A panicking test thread must not poison the server's counters.
        self.by_peer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn connection_opened(&self) {
        self.accepted.send_modify(|n| *n += 1);
        self.open.send_modify(|n| *n += 1);
    }

    fn connection_closed(&self) {
        self.open.send_modify(|n| *n = n.saturating_sub(1));
    }

    fn request_started(&self, peer: Option<SocketAddr>) {
        if let Some(peer) = peer {
            *self.by_peer().entry(peer).or_insert(0) += 1;
        }
        // After the map, so a waiter that sees the new total sees the map too.
        self.requests.send_modify(|n| *n += 1);
    }
}

/// Waits until `counter` satisfies `done`, at most `timeout`; true if it did.
async fn wait_until(
    counter: &watch::Sender<u64>,
    timeout: Duration,
    done: impl FnMut(&u64) -> bool,
) -> bool {
    let mut rx = counter.subscribe();
    let reached = matches!(
        tokio::time::timeout(timeout, rx.wait_for(done)).await,
        Ok(Ok(_))
    );
    reached
}

/// Handles to a running server thread.
#[derive(Debug)]
struct Running {
    /// Send (or drop) to kill the runtime at once.
    kill: oneshot::Sender<()>,
    /// Send to start tonic's graceful shutdown.
    graceful: Option<oneshot::Sender<()>>,
    /// Completes when the server thread has dropped its runtime.
    done: oneshot::Receiver<()>,
    /// The server thread.
    thread: JoinHandle<()>,
}

/// A tonic `echo.Echo` server on its own thread and runtime, with counters.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    name: String,
    options: ServerOptions,
    stats: Arc<Stats>,
    /// The statuses of the health service (served only with [`ServerOptions::health`]).
    health: HealthReporter,
    running: Option<Running>,
}

impl TestServer {
    /// Starts a default server on `addr` (port 0: any free port); panics if it cannot bind.
    pub fn start(addr: SocketAddr) -> TestServer {
        Self::start_with(addr, ServerOptions::default())
    }

    /// Starts a server with `options` on `addr`; panics if it cannot bind.
    pub fn start_with(addr: SocketAddr, options: ServerOptions) -> TestServer {
        match Self::try_start_with(addr, options) {
            Ok(server) => server,
            Err(err) => panic!("TestServer: cannot start on {addr}: {err}"),
        }
    }

    /// Starts a server with `options` on `addr`, returning once it listens.
    pub fn try_start_with(addr: SocketAddr, options: ServerOptions) -> io::Result<TestServer> {
        if let Some(header) = &options.name_header {
            // Checked here so that a bad name fails the start, not a call on the server thread.
            tonic::metadata::MetadataKey::<tonic::metadata::Ascii>::from_bytes(header.as_bytes())
                .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("name_header {header:?} is not a valid header name"),
                )
            })?;
        }
        let stats = Arc::new(Stats::new());
        let health = HealthReporter::new();
        let (running, bound) = spawn_server(addr, &options, &stats, &health)?;
        let name = if options.name.is_empty() {
            bound.to_string()
        } else {
            options.name.clone()
        };
        Ok(TestServer {
            addr: bound,
            name,
            options,
            stats,
            health,
            running: Some(running),
        })
    }

    /// The bound address (the real port, even if started with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>` (`https://` for a TLS server), ready for
    /// `tonic::transport::Endpoint::from_shared`.
    pub fn uri(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The name this server puts in each reply's `server` field.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the server is running (not stopped).
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// TCP connections accepted so far (across restarts).
    pub fn accepted_connections(&self) -> u64 {
        *self.stats.accepted.borrow()
    }

    /// TCP connections open right now (0 once stopped).
    pub fn open_connections(&self) -> u64 {
        *self.stats.open.borrow()
    }

    /// RPCs started so far (across restarts).
    pub fn requests(&self) -> u64 {
        *self.stats.requests.borrow()
    }

    /// RPCs started so far per client peer address (one entry per client connection).
    pub fn requests_by_peer(&self) -> HashMap<SocketAddr, u64> {
        self.stats.by_peer().clone()
    }

    /// The most unary RPCs that ran at once so far (across restarts).
    pub fn max_concurrent_unary(&self) -> u64 {
        *self.stats.max_unary_in_flight.borrow()
    }

    /// Waits until at least `n` connections were accepted; false on timeout.
    pub async fn wait_for_accepted(&self, n: u64, timeout: Duration) -> bool {
        wait_until(&self.stats.accepted, timeout, |v| *v >= n).await
    }

    /// Waits until exactly `n` connections are open; false on timeout.
    pub async fn wait_for_open_connections(&self, n: u64, timeout: Duration) -> bool {
        wait_until(&self.stats.open, timeout, |v| *v == n).await
    }

    /// Waits until at least `n` RPCs were started; false on timeout.
    pub async fn wait_for_requests(&self, n: u64, timeout: Duration) -> bool {
        wait_until(&self.stats.requests, timeout, |v| *v >= n).await
    }

    /// Sets what the health service says of `service` (`""`: the whole server), telling every
    /// client that watches it. Needs [`ServerOptions::health`] to be served.
    // Used by tests/it/health.rs, which needs the pool's feature `health`.
    #[allow(dead_code)]
    pub async fn set_health(&self, service: &str, status: ServingStatus) {
        self.health.set_service_status(service, status).await;
    }

    /// Hard kill: drops the server's runtime, closing every connection at once.
    ///
    /// Idempotent. Blocks only until the server thread has exited.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let Running {
                kill,
                graceful,
                done: _,
                thread,
            } = running;
            let _ = kill.send(());
            let _ = thread.join();
            drop(graceful);
        }
    }

    /// tonic graceful shutdown: GOAWAY to every connection, let in-flight RPCs finish.
    ///
    /// Waits at most `timeout`, then hard-kills whatever is left. Returns true
    /// if the shutdown completed gracefully in time (or it was already stopped).
    pub async fn graceful_stop(&mut self, timeout: Duration) -> bool {
        let Some(mut running) = self.running.take() else {
            return true;
        };
        if let Some(graceful) = running.graceful.take() {
            let _ = graceful.send(());
        }
        let finished = tokio::time::timeout(timeout, &mut running.done)
            .await
            .is_ok();
        let _ = running.kill.send(());
        let _ = running.thread.join();
        finished
    }

    /// Hard-stops (if running) and starts again on the same address and options.
    ///
    /// Counters carry on. Panics if the address cannot be bound again.
    pub fn restart(&mut self) {
        if let Err(err) = self.try_restart() {
            panic!("TestServer: cannot restart on {}: {err}", self.addr);
        }
    }

    /// Like [`TestServer::restart`], returning the bind error instead of panicking.
    pub fn try_restart(&mut self) -> io::Result<()> {
        self.stop();
        let (running, _) = spawn_server(self.addr, &self.options, &self.stats, &self.health)?;
        self.running = Some(running);
        Ok(())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the server thread and waits until it listens; returns the bound address.
fn spawn_server(
    addr: SocketAddr,
    options: &ServerOptions,
    stats: &Arc<Stats>,
    health: &HealthReporter,
) -> io::Result<(Running, SocketAddr)> {
    let (kill_tx, kill_rx) = oneshot::channel::<()>();
    let (graceful_tx, graceful_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let options = options.clone();
    let stats = Arc::clone(stats);
    let health = health.clone();

    let (thread, bound) = super::thread::start(
        format!("test-server-{addr}"),
        move |bound_tx| serve(addr, options, stats, health, bound_tx, kill_rx, graceful_rx),
        move || {
            let _ = done_tx.send(());
        },
    )?;
    let running = Running {
        kill: kill_tx,
        graceful: Some(graceful_tx),
        done: done_rx,
        thread,
    };
    Ok((running, bound))
}

/// Binds `addr` with `SO_REUSEADDR`, so a restarted server can take the same port.
fn bind(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The server thread's main future: bind, report, serve until killed or drained.
async fn serve(
    addr: SocketAddr,
    options: ServerOptions,
    stats: Arc<Stats>,
    health: HealthReporter,
    bound_tx: std::sync::mpsc::SyncSender<io::Result<SocketAddr>>,
    mut kill_rx: oneshot::Receiver<()>,
    graceful_rx: oneshot::Receiver<()>,
) {
    let listener = match bind(addr).and_then(|l| l.local_addr().map(|a| (l, a))) {
        Ok(bound) => bound,
        Err(err) => {
            let _ = bound_tx.send(Err(err));
            return;
        }
    };
    let (listener, bound) = listener;
    let name = if options.name.is_empty() {
        bound.to_string()
    } else {
        options.name.clone()
    };

    let conn_stats = Arc::clone(&stats);
    let incoming = TcpListenerStream::new(listener).map(move |accepted| {
        accepted.map(|stream| {
            let _ = stream.set_nodelay(true);
            CountedStream::new(stream, Arc::clone(&conn_stats))
        })
    });

    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(options.max_concurrent_streams)
        .http2_keepalive_interval(options.http2_keepalive_interval)
        .http2_keepalive_timeout(options.http2_keepalive_timeout);
    if let Some(age) = options.max_connection_age {
        builder = builder.max_connection_age(age);
    }
    if let Some(grace) = options.max_connection_age_grace {
        builder = builder.max_connection_age_grace(grace);
    }
    if let Some(tls) = options.tls.clone() {
        builder = match builder.tls_config(tls) {
            Ok(builder) => builder,
            Err(err) => {
                let _ = bound_tx.send(Err(io::Error::other(format!("TLS settings: {err}"))));
                return;
            }
        };
    }
    let service = EchoService {
        name,
        name_header: options.name_header.clone(),
        stats,
        unary_delay: options.unary_delay,
        fail_unary: options.fail_unary,
    };
    let health = options
        .health
        .then(|| HealthServer::new(SpecHealth(HealthService::from_health_reporter(health))));
    let server = builder
        // The `:authority` is not part of a tonic request's metadata; copy it into a header
        // so that `authority?` can answer with it.
        .layer(tower::util::MapRequestLayer::new(copy_authority))
        // gzip both ways when the client asks; plain otherwise.
        .add_service(
            EchoServer::new(service)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .send_compressed(tonic::codec::CompressionEncoding::Gzip),
        )
        .add_optional_service(health)
        .serve_with_incoming_shutdown(incoming, async move {
            // Fires on a graceful stop (or if the handle is gone).
            let _ = graceful_rx.await;
        });

    if bound_tx.send(Ok(bound)).is_err() {
        return; // The starter gave up waiting.
    }

    tokio::select! {
        biased;
        _ = &mut kill_rx => {}
        result = server => {
            if let Err(err) = result {
                eprintln!("TestServer {bound}: server error: {err}");
            }
        }
    }
}

/// Copies the request's `:authority` into [`AUTHORITY_HEADER`].
fn copy_authority(mut req: http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> {
    if let Some(value) = req
        .uri()
        .authority()
        .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(AUTHORITY_HEADER, value);
    }
    req
}

/// A server-side TCP connection that keeps [`Stats`] open/accepted counts.
#[derive(Debug)]
struct CountedStream {
    inner: TcpStream,
    stats: Arc<Stats>,
}

impl CountedStream {
    fn new(inner: TcpStream, stats: Arc<Stats>) -> Self {
        stats.connection_opened();
        Self { inner, stats }
    }
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.stats.connection_closed();
    }
}

impl Connected for CountedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The `echo.Echo` implementation; counts every RPC in [`Stats`].
#[derive(Debug)]
struct EchoService {
    name: String,
    /// See [`ServerOptions::name_header`].
    name_header: Option<String>,
    stats: Arc<Stats>,
    unary_delay: Duration,
    /// See [`ServerOptions::fail_unary`].
    fail_unary: bool,
}

impl EchoService {
    fn record<T>(&self, request: &Request<T>) {
        self.stats.request_started(request.remote_addr());
    }

    /// A unary response, carrying the name header when the options ask for it.
    fn unary_response(&self, reply: EchoReply) -> Response<EchoReply> {
        let mut response = Response::new(reply);
        if let Some(header) = &self.name_header {
            let key = tonic::metadata::MetadataKey::from_bytes(header.as_bytes())
                .expect("checked by try_start_with");
            let value = self.name.parse().expect("server name: printable ASCII");
            response.metadata_mut().insert(key, value);
        }
        response
    }

    fn reply(&self, payload: Vec<u8>, message: String, seq: u64) -> EchoReply {
        EchoReply {
            payload,
            message,
            server: self.name.clone(),
            seq,
        }
    }
}

/// Counts a unary RPC as running while it lives (the handler's future is dropped when the
/// client resets the call, so a cancelled call stops counting too).
struct UnaryInFlight<'a>(&'a Stats);

impl<'a> UnaryInFlight<'a> {
    fn new(stats: &'a Stats) -> Self {
        stats.unary_in_flight.send_modify(|n| *n += 1);
        let now = *stats.unary_in_flight.borrow();
        stats
            .max_unary_in_flight
            .send_modify(|max| *max = (*max).max(now));
        Self(stats)
    }
}

impl Drop for UnaryInFlight<'_> {
    fn drop(&mut self) {
        self.0
            .unary_in_flight
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Sleeps `ms` milliseconds (no-op for 0).
async fn sleep_ms(ms: u32) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.record(&request);
        let _running = UnaryInFlight::new(&self.stats);
        let metadata = request.metadata().clone();
        let header = |name: &str| {
            metadata
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let req = request.into_inner();
        if !self.unary_delay.is_zero() {
            tokio::time::sleep(self.unary_delay).await;
        }
        sleep_ms(req.sleep_ms).await;
        if self.fail_unary {
            return Err(Status::unavailable(format!(
                "{}: fails every call",
                self.name
            )));
        }
        // `user-agent?` asks for the request's user agent as the reply's message.
        if req.message == "user-agent?" {
            return Ok(self.unary_response(self.reply(Vec::new(), header("user-agent"), 0)));
        }
        // `authority?` asks for the request's `:authority`.
        if req.message == "authority?" {
            return Ok(self.unary_response(self.reply(Vec::new(), header(AUTHORITY_HEADER), 0)));
        }
        // `header?NAME` asks for the request's metadata NAME (empty when absent).
        if let Some(name) = req.message.strip_prefix("header?") {
            return Ok(self.unary_response(self.reply(req.payload, header(name), 0)));
        }
        // `unavailable-once:KEY` fails with UNAVAILABLE the first time KEY is seen, then echoes.
        if let Some(key) = req.message.strip_prefix("unavailable-once:") {
            if self.stats.first_time(key) {
                return Err(Status::unavailable(format!("{key}: unavailable once")));
            }
        }
        // `status:N` asks for gRPC status code N instead of a reply, with its own metadata.
        if let Some(code) = req.message.strip_prefix("status:") {
            let code = tonic::Code::from(code.parse::<i32>().unwrap_or(2));
            let mut status = Status::new(code, format!("{code:?} as requested"));
            status
                .metadata_mut()
                .insert("x-served-by", self.name.parse().expect("ascii name"));
            return Err(status);
        }
        Ok(self.unary_response(self.reply(req.payload, req.message, 0)))
    }

    type ServerStreamStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        self.record(&request);
        let req = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let template = self.reply(Vec::new(), req.message, 0);
        tokio::spawn(async move {
            // Bounded by `count`; ends early if the client goes away.
            for seq in 0..u64::from(req.count) {
                if seq > 0 {
                    sleep_ms(req.interval_ms).await;
                }
                let reply = EchoReply {
                    seq,
                    ..template.clone()
                };
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        self.record(&request);
        let mut inbound = request.into_inner();
        let mut payload = Vec::new();
        let mut message = String::new();
        let mut count = 0u64;
        // Bounded by the client's stream; an error (e.g. disconnect) ends it.
        while let Some(req) = inbound.message().await? {
            sleep_ms(req.sleep_ms).await;
            payload.extend_from_slice(&req.payload);
            message.push_str(&req.message);
            count += 1;
        }
        Ok(Response::new(self.reply(payload, message, count)))
    }

    type BidiStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        self.record(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let name = self.name.clone();
        tokio::spawn(async move {
            // Bounded by the client's stream; ends on its end, an error, or
            // the client dropping the response stream.
            let mut seq = 0u64;
            loop {
                let reply = match inbound.message().await {
                    Ok(Some(req)) => {
                        sleep_ms(req.sleep_ms).await;
                        Ok(EchoReply {
                            payload: req.payload,
                            message: req.message,
                            server: name.clone(),
                            seq,
                        })
                    }
                    Ok(None) => break,
                    Err(status) => Err(status),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
                seq += 1;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// tonic-health's service, answering a Watch of a service it does not know as gRPC's health
/// protocol says — `SERVICE_UNKNOWN` on the stream, which stays open — where tonic-health
/// fails the call with `NOT_FOUND`.
#[derive(Debug)]
struct SpecHealth(HealthService);

type HealthStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for SpecHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.0.check(request).await
    }

    type WatchStream = HealthStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthStream>, Status> {
        match self.0.watch(request).await {
            Ok(response) => Ok(response.map(|stream| Box::pin(stream) as HealthStream)),
            Err(status) if status.code() == tonic::Code::NotFound => {
                let unknown = HealthCheckResponse {
                    status: WireStatus::ServiceUnknown as i32,
                };
                // One answer, then the stream stays open until the client leaves.
                let stream = tokio_stream::once(Ok(unknown)).chain(tokio_stream::pending());
                Ok(Response::new(Box::pin(stream) as HealthStream))
            }
            Err(status) => Err(status),
        }
    }
}

/// Where a [`UnixServer`] listens.
#[cfg(unix)]
#[derive(Clone, Debug)]
pub enum UnixListen {
    /// A socket file at this path (removed before binding and when the server stops).
    Path(std::path::PathBuf),
    /// A name in Linux's abstract namespace (without the leading NUL).
    #[cfg(target_os = "linux")]
    Abstract(Vec<u8>),
}

/// A plain `echo.Echo` server (no options) on a Unix domain socket, on its own thread and
/// runtime as [`TestServer`] is; its name (each reply's `server`) is the listen address.
#[cfg(unix)]
#[derive(Debug)]
pub struct UnixServer {
    listen: UnixListen,
    tls: Option<tonic::transport::ServerTlsConfig>,
    stats: Arc<Stats>,
    running: Option<Running>,
}

#[cfg(unix)]
impl UnixServer {
    /// Starts serving on `listen`, returning once it listens.
    pub fn start(listen: UnixListen) -> io::Result<UnixServer> {
        Self::start_tls(listen, None)
    }

    /// Starts serving on `listen`, over TLS when `tls` is given.
    pub fn start_tls(
        listen: UnixListen,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> io::Result<UnixServer> {
        let mut server = UnixServer {
            listen,
            tls,
            stats: Arc::new(Stats::new()),
            running: None,
        };
        server.restart()?;
        Ok(server)
    }

    /// Requests served (over every start).
    pub fn requests(&self) -> u64 {
        *self.stats.requests.borrow()
    }

    /// Hard kill: drops the runtime, closing every connection at once, and removes a
    /// socket file, so that connecting fails until a restart. Idempotent.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.kill.send(());
            let _ = running.thread.join();
        }
        if let UnixListen::Path(path) = &self.listen {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Stops (if running) and listens again at the same place; counters carry on.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let (listen, tls, stats) = (
            self.listen.clone(),
            self.tls.clone(),
            Arc::clone(&self.stats),
        );
        let (thread, ()) = super::thread::start(
            "test-unix-server".to_owned(),
            move |started| serve_unix(listen, tls, stats, started, kill_rx),
            move || {
                let _ = done_tx.send(());
            },
        )?;
        self.running = Some(Running {
            kill: kill_tx,
            graceful: None,
            done: done_rx,
            thread,
        });
        Ok(())
    }
}

#[cfg(unix)]
impl Drop for UnixServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds the Unix listener of `listen`.
#[cfg(unix)]
fn bind_unix(listen: &UnixListen) -> io::Result<tokio::net::UnixListener> {
    match listen {
        UnixListen::Path(path) => {
            let _ = std::fs::remove_file(path);
            tokio::net::UnixListener::bind(path)
        }
        #[cfg(target_os = "linux")]
        UnixListen::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            let listener = std::os::unix::net::UnixListener::bind_addr(&addr)?;
            listener.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(listener)
        }
    }
}

/// The Unix server thread's main future: bind, report, serve until killed.
#[cfg(unix)]
async fn serve_unix(
    listen: UnixListen,
    tls: Option<tonic::transport::ServerTlsConfig>,
    stats: Arc<Stats>,
    started: super::thread::Started<()>,
    kill_rx: oneshot::Receiver<()>,
) {
    let listener = match bind_unix(&listen) {
        Ok(listener) => listener,
        Err(err) => {
            let _ = started.send(Err(err));
            return;
        }
    };
    let service = EchoService {
        name: format!("{listen:?}"),
        name_header: None,
        stats,
        unary_delay: Duration::ZERO,
        fail_unary: false,
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = match builder.tls_config(tls) {
            Ok(builder) => builder,
            Err(err) => {
                let _ = started.send(Err(io::Error::other(format!("TLS settings: {err}"))));
                return;
            }
        };
    }
    let server = builder
        .layer(tower::util::MapRequestLayer::new(copy_authority))
        .add_service(EchoServer::new(service))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener));
    if started.send(Ok(())).is_err() {
        return;
    }
    tokio::select! {
        biased;
        _ = kill_rx => {}
        result = server => {
            if let Err(err) = result {
                eprintln!("UnixServer {listen:?}: server error: {err}");
            }
        }
    }
}
