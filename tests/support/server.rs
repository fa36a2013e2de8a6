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
use tokio_stream::StreamExt;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Status, Streaming};

use super::echo::echo_server::{Echo, EchoServer};
use super::echo::{EchoReply, EchoRequest, StreamRequest};

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
    /// Added to every unary call's own `sleep_ms`: a server slower than its peers.
    pub unary_delay: Duration,
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
}

impl Stats {
    fn new() -> Self {
        Self {
            accepted: watch::Sender::new(0),
            open: watch::Sender::new(0),
            requests: watch::Sender::new(0),
            by_peer: Mutex::new(HashMap::new()),
        }
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
        let stats = Arc::new(Stats::new());
        let (running, bound) = spawn_server(addr, &options, &stats)?;
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
            running: Some(running),
        })
    }

    /// The bound address (the real port, even if started with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, ready for `tonic::transport::Endpoint::from_shared`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
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
        let (running, _) = spawn_server(self.addr, &self.options, &self.stats)?;
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
) -> io::Result<(Running, SocketAddr)> {
    let (kill_tx, kill_rx) = oneshot::channel::<()>();
    let (graceful_tx, graceful_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let options = options.clone();
    let stats = Arc::clone(stats);

    let (thread, bound) = super::thread::start(
        format!("test-server-{addr}"),
        move |bound_tx| serve(addr, options, stats, bound_tx, kill_rx, graceful_rx),
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
    let service = EchoService {
        name,
        stats,
        unary_delay: options.unary_delay,
    };
    let server = builder
        .add_service(EchoServer::new(service))
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
    stats: Arc<Stats>,
    unary_delay: Duration,
}

impl EchoService {
    fn record<T>(&self, request: &Request<T>) {
        self.stats.request_started(request.remote_addr());
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
        let user_agent = request
            .metadata()
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let req = request.into_inner();
        if !self.unary_delay.is_zero() {
            tokio::time::sleep(self.unary_delay).await;
        }
        sleep_ms(req.sleep_ms).await;
        // `user-agent?` asks for the request's user agent as the reply's message.
        if req.message == "user-agent?" {
            return Ok(Response::new(self.reply(Vec::new(), user_agent, 0)));
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
        Ok(Response::new(self.reply(req.payload, req.message, 0)))
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
