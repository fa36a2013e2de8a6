//! [`TestProxy`]: a fault-injecting TCP proxy for tests.
//!
//! The proxy listens on its own address and forwards every accepted
//! connection byte for byte, in both directions, to an upstream address
//! (usually a [`TestServer`](super::TestServer)). A test points its client at
//! [`TestProxy::uri`] and then injects faults with [`TestProxy::set_mode`] and
//! [`TestProxy::reset_all`]:
//!
//! | [`Mode`]              | new connections                          | open connections                  |
//! |-----------------------|------------------------------------------|-----------------------------------|
//! | [`Mode::Forward`]     | accepted and forwarded                   | forwarded                         |
//! | [`Mode::Blackhole`]   | accepted, then silent (no upstream yet)  | paused: nothing is read or written |
//! | [`Mode::Refuse`]      | `ECONNREFUSED` (the listener is closed)  | forwarded, untouched              |
//! | [`Mode::ResetAll`]    | accepted, then reset at once (RST)       | reset (RST) when the mode is set  |
//!
//! Like [`TestServer`](super::TestServer), the proxy runs on its own OS thread
//! with its own current-thread tokio runtime, so it shares no tasks with the
//! test's runtime, and every control method can be called from any thread or
//! runtime. [`TestProxy::set_mode`] and [`TestProxy::reset_all`] return once
//! the proxy has applied the change (listener closed, connections reset); they
//! block the calling thread for that short moment, like
//! [`TestServer::stop`](super::TestServer::stop) does.
//!
//! Details worth knowing:
//!
//! - A connection opens its upstream connection lazily, when it is first
//!   allowed to forward: one accepted during [`Mode::Blackhole`] reaches the
//!   upstream only after the mode changes back. Upstream connections use the
//!   address set by [`TestProxy::set_upstream`] at that moment.
//! - [`Mode::Blackhole`] does not drop bytes: it stops reading, so they wait
//!   in the kernel's buffers (TCP flow control stalls a busy sender). Going
//!   back to [`Mode::Forward`] resumes every paused connection losslessly,
//!   like a network partition that heals. While paused, the proxy does not
//!   notice a peer closing either (it is not reading).
//! - Closes are propagated: an EOF from one side becomes a write shutdown
//!   (FIN) on the other, and a reset or I/O error on either side resets both.
//!   If the upstream connect fails, the client connection is reset.
//! - [`TestProxy::stop`] (and `Drop`) drops the proxy's runtime: the listener
//!   and every connection are closed at once with a plain close (FIN; the
//!   kernel sends RST instead where unread bytes are pending).
//!
//! - [`TestProxy::try_start_round_robin`] makes it an L4 load balancer in the way a cloud
//!   SLB is one: each new connection goes to the next of several upstreams in turn, and
//!   every byte of that connection then stays with that upstream (it spreads connections,
//!   not calls).
//!
//! Counters and waits are event driven ([`tokio::sync::watch`]) and bounded by
//! a timeout, using tokio's clock: don't call the `wait_for_*` methods from a
//! test whose time is paused.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

/// How long a control call waits for the proxy thread to apply it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the proxy waits for reset connections to finish closing.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection waits for its upstream TCP connect.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts (and the pause between them) to listen again after [`Mode::Refuse`].
const REBIND_ATTEMPTS: u32 = 50;
/// Pause between two rebind attempts.
const REBIND_PAUSE: Duration = Duration::from_millis(20);
/// Pause after a failed `accept`, so a persistent error cannot spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Backlog of the listening socket.
const LISTEN_BACKLOG: u32 = 1024;
/// Size of each direction's copy buffer.
const BUFFER_SIZE: usize = 16 * 1024;

/// What the proxy does with connections; see the [module docs](self).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Accept and forward both ways (the normal mode).
    #[default]
    Forward,
    /// Accept new connections but forward nothing, in either direction, on any
    /// connection: bytes are left unread. New connections are accepted (not
    /// refused) and stay silent. Back to `Forward`, everything resumes.
    Blackhole,
    /// Close the listener, so new connects fail with `ECONNREFUSED` (and
    /// connections still in the accept backlog are reset). Open connections
    /// keep forwarding; combine with [`TestProxy::reset_all`] to also drop
    /// them. Leaving this mode listens again on the same address.
    Refuse,
    /// Reset (RST) every open connection when set, and every new connection
    /// right after accepting it, until the mode changes. New connections are
    /// accepted (and counted), but on loopback the RST often arrives before
    /// the client's `connect` has finished, so the connect itself may fail
    /// with `ECONNRESET` instead of a later read or write.
    ResetAll,
}

impl Mode {
    /// Whether open connections move bytes in this mode.
    fn forwards(self) -> bool {
        matches!(self, Mode::Forward | Mode::Refuse)
    }
}

/// A control request sent to the proxy thread; `ack` fires once applied.
#[derive(Debug)]
enum Command {
    /// Switch to a mode.
    SetMode(Mode, std::sync::mpsc::SyncSender<()>),
    /// Reset every open connection, keep the mode.
    ResetAll(std::sync::mpsc::SyncSender<()>),
}

/// State shared between a [`TestProxy`] handle and its proxy thread.
#[derive(Debug)]
struct Shared {
    /// The current mode; connection tasks watch it.
    mode: watch::Sender<Mode>,
    /// Bumped to make every open connection reset itself.
    reset: watch::Sender<u64>,
    /// Where new upstream connections go: one address, or several taken in turn.
    upstreams: Mutex<Vec<SocketAddr>>,
    /// How many upstream connections were opened: picks the next of `upstreams`.
    upstream_turn: std::sync::atomic::AtomicUsize,
    /// Client connections accepted so far.
    accepted: watch::Sender<u64>,
    /// Client connections open right now.
    open: watch::Sender<u64>,
}

impl Shared {
    fn upstreams(&self) -> std::sync::MutexGuard<'_, Vec<SocketAddr>> {
        // A panicking test thread must not poison the proxy's state.
        self.upstreams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Where the next upstream connection goes: the upstreams in turn (never empty).
    fn next_upstream(&self) -> SocketAddr {
        let upstreams = self.upstreams();
        let turn = self
            .upstream_turn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        upstreams[turn % upstreams.len()]
    }
}

/// Counts a client connection as accepted and open, until dropped.
#[derive(Debug)]
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.accepted.send_modify(|n| *n += 1);
        shared.open.send_modify(|n| *n += 1);
        Self(Arc::clone(shared))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.send_modify(|n| *n = n.saturating_sub(1));
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

/// Handles to the running proxy thread.
#[derive(Debug)]
struct Running {
    /// Control requests for the proxy thread.
    commands: mpsc::UnboundedSender<Command>,
    /// Send (or drop) to stop the proxy at once.
    kill: oneshot::Sender<()>,
    /// The proxy thread.
    thread: JoinHandle<()>,
}

/// A fault-injecting TCP proxy on its own thread and runtime; see the [module docs](self).
pub struct TestProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    running: Option<Running>,
}

impl fmt::Debug for TestProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestProxy")
            .field("addr", &self.addr)
            .field("upstreams", &*self.shared.upstreams())
            .field("mode", &self.mode())
            .field("accepted", &self.accepted())
            .field("open", &self.open())
            .field("running", &self.is_running())
            .finish()
    }
}

impl TestProxy {
    /// Starts a proxy listening on `listen` (port 0: any free port) that
    /// forwards to `upstream`; panics if it cannot bind.
    pub fn start(listen: SocketAddr, upstream: SocketAddr) -> TestProxy {
        match Self::try_start(listen, upstream) {
            Ok(proxy) => proxy,
            Err(err) => panic!("TestProxy: cannot start on {listen}: {err}"),
        }
    }

    /// Like [`TestProxy::start`], returning the bind error instead of panicking.
    pub fn try_start(listen: SocketAddr, upstream: SocketAddr) -> io::Result<TestProxy> {
        Self::try_start_round_robin(listen, &[upstream])
    }

    /// Starts an L4 load balancer on `listen`: each accepted connection goes to the next
    /// of `upstreams` in turn (see the [module docs](self)). Fails if it cannot bind or
    /// `upstreams` is empty.
    pub fn try_start_round_robin(
        listen: SocketAddr,
        upstreams: &[SocketAddr],
    ) -> io::Result<TestProxy> {
        if upstreams.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TestProxy needs at least one upstream",
            ));
        }
        let shared = Arc::new(Shared {
            mode: watch::Sender::new(Mode::Forward),
            reset: watch::Sender::new(0),
            upstreams: Mutex::new(upstreams.to_vec()),
            upstream_turn: std::sync::atomic::AtomicUsize::new(0),
            accepted: watch::Sender::new(0),
            open: watch::Sender::new(0),
        });
        let (running, addr) = spawn_proxy(listen, &shared)?;
        Ok(TestProxy {
            addr,
            shared,
            running: Some(running),
        })
    }

    /// The bound listen address (the real port, even if started with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, ready for `tonic::transport::Endpoint::from_shared`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address new upstream connections go to (the first, for a round-robin proxy).
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstreams()[0]
    }

    /// Retargets upstream connections made from now on to this one address (open ones
    /// stay put).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.shared.upstreams() = vec![upstream];
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Whether the proxy is running (not stopped).
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Switches to `mode`, returning once the proxy has applied it.
    ///
    /// After it returns: in [`Mode::Blackhole`] no further byte is forwarded;
    /// in [`Mode::Refuse`] the listener is closed; in [`Mode::ResetAll`] every
    /// connection that was open has been reset. Panics if the proxy thread
    /// does not apply it within 10 s; does nothing once stopped.
    pub fn set_mode(&self, mode: Mode) {
        self.command(|ack| Command::SetMode(mode, ack));
    }

    /// Resets (RST) every open connection now, keeping the mode: new
    /// connections are handled as usual. Returns once they are all reset.
    pub fn reset_all(&self) {
        self.command(Command::ResetAll);
    }

    /// Client connections accepted so far (including reset ones).
    pub fn accepted(&self) -> u64 {
        *self.shared.accepted.borrow()
    }

    /// Client connections open right now (0 once stopped).
    pub fn open(&self) -> u64 {
        *self.shared.open.borrow()
    }

    /// Waits until at least `n` connections were accepted; false on timeout.
    pub async fn wait_for_accepted(&self, n: u64, timeout: Duration) -> bool {
        wait_until(&self.shared.accepted, timeout, |v| *v >= n).await
    }

    /// Waits until exactly `n` connections are open; false on timeout.
    pub async fn wait_for_open(&self, n: u64, timeout: Duration) -> bool {
        wait_until(&self.shared.open, timeout, |v| *v == n).await
    }

    /// Stops the proxy: drops its runtime, closing the listener and every
    /// connection at once. Idempotent; blocks only until the thread exits.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let Running {
                commands,
                kill,
                thread,
            } = running;
            let _ = kill.send(());
            let _ = thread.join();
            drop(commands);
        }
    }

    /// Sends a command to the proxy thread and waits until it was applied.
    fn command(&self, make: impl FnOnce(std::sync::mpsc::SyncSender<()>) -> Command) {
        let Some(running) = &self.running else {
            return;
        };
        let (ack_tx, ack_rx) = std::sync::mpsc::sync_channel(1);
        if running.commands.send(make(ack_tx)).is_err() {
            return; // The proxy thread is gone.
        }
        match ack_rx.recv_timeout(COMMAND_TIMEOUT) {
            // Disconnected: the proxy thread stopped before applying it.
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!(
                    "TestProxy {}: control request not applied in time",
                    self.addr
                )
            }
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the proxy thread and waits until it listens; returns the bound address.
fn spawn_proxy(listen: SocketAddr, shared: &Arc<Shared>) -> io::Result<(Running, SocketAddr)> {
    let (kill_tx, kill_rx) = oneshot::channel::<()>();
    let (commands_tx, commands_rx) = mpsc::unbounded_channel::<Command>();
    let shared = Arc::clone(shared);

    let (thread, bound) = super::thread::start(
        format!("test-proxy-{listen}"),
        move |bound_tx| run(listen, shared, bound_tx, commands_rx, kill_rx),
        || {},
    )?;
    let running = Running {
        commands: commands_tx,
        kill: kill_tx,
        thread,
    };
    Ok((running, bound))
}

/// Binds and listens on `addr` with `SO_REUSEADDR`, so the proxy can listen
/// again on its port after [`Mode::Refuse`] while old connections still use it.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Listens on `addr` again, retrying a bounded number of times.
async fn rebind(addr: SocketAddr) -> Option<TcpListener> {
    let mut last_err = None;
    for attempt in 0..REBIND_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(REBIND_PAUSE).await;
        }
        match bind(addr) {
            Ok(listener) => return Some(listener),
            Err(err) => last_err = Some(err),
        }
    }
    if let Some(err) = last_err {
        eprintln!("TestProxy {addr}: cannot listen again: {err}");
    }
    None
}

/// Accepts from `listener`, or never completes if there is none.
async fn accept(listener: &Option<TcpListener>) -> io::Result<TcpStream> {
    match listener {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// Resets `stream` on drop: `SO_LINGER` 0 makes the close send RST.
fn set_reset_on_close(stream: &TcpStream) {
    // `set_linger` is deprecated because a non-zero linger blocks the thread
    // on drop; a zero linger never blocks, it just sends RST.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}

/// Resets every connection task in `tasks` and waits (bounded) until they are gone.
async fn reset_connections(shared: &Shared, tasks: &mut JoinSet<()>) {
    shared.reset.send_modify(|n| *n += 1);
    let drained = tokio::time::timeout(RESET_TIMEOUT, async {
        while let Some(result) = tasks.join_next().await {
            report_task_end(result);
        }
    })
    .await;
    if drained.is_err() {
        eprintln!("TestProxy: connections did not reset in time; aborting them");
        tasks.abort_all();
    }
}

/// Reports a connection task that panicked (they are not meant to).
fn report_task_end(result: Result<(), tokio::task::JoinError>) {
    if let Err(err) = result {
        if err.is_panic() {
            eprintln!("TestProxy: connection task panicked: {err}");
        }
    }
}

/// The proxy thread's main future: bind, report, then accept and obey
/// commands until killed or the handle is gone.
async fn run(
    listen: SocketAddr,
    shared: Arc<Shared>,
    bound_tx: std::sync::mpsc::SyncSender<io::Result<SocketAddr>>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut kill_rx: oneshot::Receiver<()>,
) {
    let (listener, addr) = match bind(listen).and_then(|l| l.local_addr().map(|a| (l, a))) {
        Ok(bound) => bound,
        Err(err) => {
            let _ = bound_tx.send(Err(err));
            return;
        }
    };
    if bound_tx.send(Ok(addr)).is_err() {
        return; // The starter gave up waiting.
    }
    let mut listener = Some(listener);
    let mut tasks = JoinSet::new();

    loop {
        tokio::select! {
            biased;
            _ = &mut kill_rx => break,
            command = commands.recv() => {
                let Some(command) = command else { break };
                let ack = match command {
                    Command::SetMode(mode, ack) => {
                        shared.mode.send_replace(mode);
                        match mode {
                            Mode::Refuse => listener = None,
                            Mode::ResetAll => reset_connections(&shared, &mut tasks).await,
                            Mode::Forward | Mode::Blackhole => {}
                        }
                        if mode != Mode::Refuse && listener.is_none() {
                            listener = rebind(addr).await;
                        }
                        ack
                    }
                    Command::ResetAll(ack) => {
                        reset_connections(&shared, &mut tasks).await;
                        ack
                    }
                };
                let _ = ack.send(());
            }
            Some(result) = tasks.join_next() => report_task_end(result),
            accepted = accept(&listener) => match accepted {
                Ok(client) => {
                    let guard = OpenGuard::new(&shared);
                    if *shared.mode.borrow() == Mode::ResetAll {
                        set_reset_on_close(&client);
                        drop((client, guard));
                    } else {
                        let reset = shared.reset.subscribe();
                        tasks.spawn(connection(client, Arc::clone(&shared), reset, guard));
                    }
                }
                Err(err) => {
                    // Per-connection errors (e.g. ECONNABORTED) or fd
                    // exhaustion: pause briefly so it cannot spin.
                    eprintln!("TestProxy {addr}: accept error: {err}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// Both directions reached EOF: close normally.
    Closed,
    /// Reset requested or an error on either side: reset both sides.
    Reset,
}

/// One proxied client connection; ends when both sides are done or on reset.
async fn connection(
    mut client: TcpStream,
    shared: Arc<Shared>,
    mut reset: watch::Receiver<u64>,
    _guard: OpenGuard,
) {
    let _ = client.set_nodelay(true);
    let mut upstream = None;
    let end = tokio::select! {
        biased;
        // Err (sender gone) cannot happen while `shared` lives; reset anyway.
        _ = reset.changed() => End::Reset,
        end = forward(&mut client, &mut upstream, &shared) => end,
    };
    if end == End::Reset {
        set_reset_on_close(&client);
        if let Some(upstream) = &upstream {
            set_reset_on_close(upstream);
        }
    }
    // Dropping both streams closes (or resets) them.
}

/// Connects upstream once forwarding is allowed, then copies both ways.
async fn forward(
    client: &mut TcpStream,
    upstream_slot: &mut Option<TcpStream>,
    shared: &Shared,
) -> End {
    let mut mode = shared.mode.subscribe();
    if mode.wait_for(|m| m.forwards()).await.is_err() {
        return End::Reset;
    }
    let target = shared.next_upstream();
    let upstream =
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(_)) | Err(_) => return End::Reset,
        };
    let _ = upstream.set_nodelay(true);
    let upstream = upstream_slot.insert(upstream);

    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let both = tokio::try_join!(
        pump(client_read, upstream_write, shared.mode.subscribe()),
        pump(upstream_read, client_write, shared.mode.subscribe()),
    );
    match both {
        Ok(_) => End::Closed,
        Err(_) => End::Reset,
    }
}

/// Copies `from` to `to` until EOF (then shuts `to` down), reading and
/// writing only while the mode forwards. Bounded by the peers: it ends on
/// EOF or on the first I/O error.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    mut mode: watch::Receiver<Mode>,
) -> io::Result<()> {
    let stopped = || io::Error::other("proxy stopped");
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        // Read only while forwarding. A read is cancel safe, so a mode change
        // may interrupt it without losing bytes.
        let n = loop {
            mode.wait_for(|m| m.forwards())
                .await
                .map_err(|_| stopped())?;
            tokio::select! {
                biased;
                changed = mode.changed() => changed.map_err(|_| stopped())?,
                read = from.read(&mut buf) => break read?,
            }
        };
        // Bytes read just before a switch to Blackhole wait for Forward.
        mode.wait_for(|m| m.forwards())
            .await
            .map_err(|_| stopped())?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
    }
}
