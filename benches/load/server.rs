//! The echo servers: each runs in a process of its own (this binary re-executed), so that its
//! CPU can be read apart from the load generator's. [`ServerProc`] is the bench's handle on
//! one; [`run`] is what the re-executed binary does; the `/proc` readers measure CPU.
//!
//! The load bench starts one process per address; the scale bench (`benches/scale/`, which
//! shares this file) starts few processes with many addresses each — one tonic `Server` per
//! address on the process's one thread — and may give each address a `max_connection_age`,
//! so that its connections are recycled (GOAWAY) at a rate the bench chooses.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::common::echo::echo_server::{Echo, EchoServer};
use crate::common::echo::{EchoReply, EchoRequest, StreamRequest};
use crate::common::BenchEcho;
use crate::BoxError;

/// Set (to `ip:port`, or several separated by commas) when this binary runs as a server
/// process.
pub(crate) const SERVER_ENV: &str = "TONIC_POOL_BENCH_SERVER";
/// Each address's `max_connection_age` in ms (comma-separated, one per address of
/// [`SERVER_ENV`]), when set: the server sends GOAWAY to a connection that old.
const MAX_AGE_ENV: &str = "TONIC_POOL_BENCH_MAX_AGE_MS";
/// The server's `max_concurrent_streams`, when set.
const MCS_ENV: &str = "TONIC_POOL_BENCH_MCS";
/// The server's TLS certificate and key (PEM), when it serves TLS.
const TLS_CERT_ENV: &str = "TONIC_POOL_BENCH_TLS_CERT";
const TLS_KEY_ENV: &str = "TONIC_POOL_BENCH_TLS_KEY";
/// The name the TLS scenario's certificate is for; clients verify it.
pub(crate) const TLS_NAME: &str = "bench.test";
/// Set (to anything) for a server that also serves gRPC's health service (S7), whose status
/// the bench sets through stdin (`health SERVING|NOT_SERVING`), and that keeps the time its
/// last `Unary` call started (`last`).
const HEALTH_ENV: &str = "TONIC_POOL_BENCH_HEALTH";
/// Milliseconds the server adds to every unary call (S5's slow server), when set.
const DELAY_ENV: &str = "TONIC_POOL_BENCH_DELAY_MS";
/// Set (to anything) for a server that fails every unary call at once with UNAVAILABLE, its
/// transport healthy (S6's failing server).
const FAIL_ENV: &str = "TONIC_POOL_BENCH_FAIL";
/// Linux reports process CPU times in clock ticks of 1/100 s (`USER_HZ`) on every common
/// architecture.
const CLOCK_TICKS_PER_SEC: u64 = 100;

// === the bench's side: server processes ===

/// The TLS scenario's server certificate for [`TLS_NAME`], made at start with rcgen. It is
/// self-signed, so clients trust the certificate itself as their root.
#[derive(Clone, Debug)]
pub(crate) struct BenchTls {
    pub(crate) cert_pem: String,
    key_pem: String,
}

impl BenchTls {
    pub(crate) fn generate() -> Result<Self, BoxError> {
        let certified = rcgen::generate_simple_self_signed(vec![TLS_NAME.to_owned()])?;
        Ok(Self {
            cert_pem: certified.cert.pem(),
            key_pem: certified.signing_key.serialize_pem(),
        })
    }
}

/// A server process started by this bench; it exits when dropped (its stdin closes).
#[derive(Debug)]
pub(crate) struct ServerProc {
    /// The first (in the load bench: the only) address it serves.
    pub(crate) addr: SocketAddr,
    /// Every address it serves, in the order asked for.
    pub(crate) addrs: Vec<SocketAddr>,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl ServerProc {
    /// Starts a server on `ip`; `delay_ms` (if not 0) is added to every unary call.
    pub(crate) fn spawn(
        ip: Ipv4Addr,
        max_concurrent_streams: Option<u32>,
        tls: Option<&BenchTls>,
        delay_ms: u32,
        fail: bool,
    ) -> Result<Self, BoxError> {
        Self::spawn_with(
            &[ip],
            None,
            max_concurrent_streams,
            tls,
            delay_ms,
            fail,
            false,
        )
    }

    /// A server that also serves gRPC's health service (see [`Self::set_health`]).
    #[cfg_attr(not(feature = "health"), allow(dead_code))] // used by S7 only
    pub(crate) fn spawn_with_health(ip: Ipv4Addr) -> Result<Self, BoxError> {
        Self::spawn_with(&[ip], None, None, None, 0, false, true)
    }

    /// One process serving every address of `ips` (one tonic `Server` each, ports chosen by
    /// the OS); with `max_ages`, address `i` sends GOAWAY to each connection `max_ages[i]`
    /// after accepting it (tonic's `max_connection_age`), which recycles connections.
    #[allow(dead_code)] // used by the scale bench only
    pub(crate) fn spawn_many(
        ips: &[Ipv4Addr],
        max_ages: Option<&[Duration]>,
    ) -> Result<Self, BoxError> {
        if ips.is_empty() || max_ages.is_some_and(|ages| ages.len() != ips.len()) {
            return Err("spawn_many: one max age per address, at least one address".into());
        }
        Self::spawn_with(ips, max_ages, None, None, 0, false, false)
    }

    fn spawn_with(
        ips: &[Ipv4Addr],
        max_ages: Option<&[Duration]>,
        max_concurrent_streams: Option<u32>,
        tls: Option<&BenchTls>,
        delay_ms: u32,
        fail: bool,
        health: bool,
    ) -> Result<Self, BoxError> {
        let list: Vec<String> = ips.iter().map(|ip| format!("{ip}:0")).collect();
        let mut command = Command::new(std::env::current_exe()?);
        command
            .env(SERVER_ENV, list.join(","))
            .env_remove(MAX_AGE_ENV)
            .env_remove(MCS_ENV)
            .env_remove(TLS_CERT_ENV)
            .env_remove(TLS_KEY_ENV)
            .env_remove(HEALTH_ENV)
            .env(DELAY_ENV, delay_ms.to_string())
            .env_remove(FAIL_ENV)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(mcs) = max_concurrent_streams {
            command.env(MCS_ENV, mcs.to_string());
        }
        if let Some(tls) = tls {
            command
                .env(TLS_CERT_ENV, &tls.cert_pem)
                .env(TLS_KEY_ENV, &tls.key_pem);
        }
        if health {
            command.env(HEALTH_ENV, "1");
        }
        if fail {
            command.env(FAIL_ENV, "1");
        }
        if let Some(ages) = max_ages {
            let ms: Vec<String> = ages.iter().map(|a| a.as_millis().to_string()).collect();
            command.env(MAX_AGE_ENV, ms.join(","));
        }
        let mut child = command.spawn()?;
        let stdin = child.stdin.take().ok_or("server stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("server stdout")?);
        let first = SocketAddr::from((ips[0], 0));
        let mut server = Self {
            addr: first,
            addrs: Vec::new(),
            child,
            stdin: Some(stdin),
            stdout,
        };
        // The server prints its addresses (comma-separated) as soon as it listens on every
        // one of them (or exits on failure: EOF).
        let line = server.read_line()?;
        server.addrs = line
            .strip_prefix("listening ")
            .ok_or_else(|| format!("server on {}: unexpected first line {line:?}", ips[0]))?
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        if server.addrs.len() != ips.len() {
            return Err(format!("server: asked for {} addresses, got {line:?}", ips.len()).into());
        }
        server.addr = server.addrs[0];
        Ok(server)
    }

    fn read_line(&mut self) -> Result<String, BoxError> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err(format!("server {} exited", self.addr).into());
        }
        Ok(line.trim_end().to_owned())
    }

    /// Unary calls the server has started so far.
    fn requests(&mut self) -> Result<u64, BoxError> {
        Ok(self.ask("stats")?.parse()?)
    }

    /// Sends one command line, returns the answer line.
    fn ask(&mut self, command: &str) -> Result<String, BoxError> {
        let stdin = self.stdin.as_mut().ok_or("server stdin closed")?;
        writeln!(stdin, "{command}")?;
        stdin.flush()?;
        self.read_line()
    }

    /// Sets the status the server's health service reports for the whole server (`SERVING`
    /// or `NOT_SERVING`); returns when (µs since the Unix epoch, the server's clock) the
    /// status changed, and how many calls the server had started by then.
    #[cfg_attr(not(feature = "health"), allow(dead_code))] // used by S7 only
    pub(crate) fn set_health(&mut self, status: &str) -> Result<(u64, u64), BoxError> {
        let answer = self.ask(&format!("health {status}"))?;
        parse_pair(&answer)
    }

    /// When (µs since the Unix epoch, the server's clock) the server's last `Unary` call
    /// started (0: none yet), and how many it has started.
    #[cfg_attr(not(feature = "health"), allow(dead_code))] // used by S7 only
    pub(crate) fn last_call(&mut self) -> Result<(u64, u64), BoxError> {
        let answer = self.ask("last")?;
        parse_pair(&answer)
    }

    /// Connections the server has accepted so far, over all its addresses.
    #[allow(dead_code)] // used by the scale bench only
    pub(crate) fn accepted(&mut self) -> Result<u64, BoxError> {
        Ok(self.ask("accepted")?.parse()?)
    }

    /// CPU time the server process has used so far.
    pub(crate) fn cpu(&self) -> Result<Duration, BoxError> {
        process_cpu(&format!("/proc/{}/stat", self.child.id()))
    }

    /// The server's process id (for `/proc/<pid>/…`).
    #[allow(dead_code)] // used by the scale bench only
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// File descriptors the server process has open now (its listeners, its connections'
    /// sockets, a few of its own): the server-side view of how many connections are open.
    #[allow(dead_code)] // used by the scale bench only
    pub(crate) fn open_fds(&self) -> Result<usize, BoxError> {
        open_fds(&format!("/proc/{}/fd", self.child.id()))
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        // Closing stdin asks the server to exit; kill it (by its own handle) if it lingers.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg_attr(not(feature = "health"), allow(dead_code))] // used by S7 only
fn parse_pair(answer: &str) -> Result<(u64, u64), BoxError> {
    let mut parts = answer.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Ok((a, b)),
        _ => Err(format!("server: unexpected answer {answer:?}").into()),
    }
}

/// `utime + stime` of a process, from `/proc/<pid>/stat`.
pub(crate) fn process_cpu(path: &str) -> Result<Duration, BoxError> {
    let stat = std::fs::read_to_string(path)?;
    // Fields after the command name (which may contain spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').ok_or("bad /proc stat")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .ok_or("short /proc stat")?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<u64, _>>()?;
    Ok(Duration::from_millis(ticks * 1000 / CLOCK_TICKS_PER_SEC))
}

/// How many file descriptors a process has open (`/proc/<pid>/fd`, or `/proc/self/fd`).
#[allow(dead_code)] // used by the scale bench only
pub(crate) fn open_fds(dir: &str) -> Result<usize, BoxError> {
    Ok(std::fs::read_dir(dir)?.count())
}

/// CPU time the whole machine has been busy (every core, every process: the `cpu` line of
/// `/proc/stat`, user + nice + system + irq + softirq + steal).
pub(crate) fn machine_busy() -> Result<Duration, BoxError> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().ok_or("empty /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u64>())
        .collect::<Result<_, _>>()?;
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| ticks.get(i).copied().unwrap_or(0))
        .sum();
    Ok(Duration::from_millis(busy * 1000 / CLOCK_TICKS_PER_SEC))
}

/// Total CPU of the servers and each one's request count.
pub(crate) fn server_counters(
    servers: &mut [ServerProc],
) -> Result<(Duration, Vec<u64>), BoxError> {
    let mut cpu = Duration::ZERO;
    let mut requests = Vec::with_capacity(servers.len());
    for server in servers {
        cpu += server.cpu()?;
        requests.push(server.requests()?);
    }
    Ok((cpu, requests))
}

// === the server process's side (this binary with `TONIC_POOL_BENCH_SERVER` set) ===

/// Serves the echo service on every address of `addrs` (comma-separated) until stdin closes.
pub(crate) fn run(addrs: &str) -> Result<(), BoxError> {
    let addrs: Vec<SocketAddr> = addrs.split(',').map(str::parse).collect::<Result<_, _>>()?;
    let max_ages: Vec<Option<Duration>> = match std::env::var(MAX_AGE_ENV) {
        Ok(v) => v
            .split(',')
            .map(|ms| ms.parse::<u64>().map(|ms| Some(Duration::from_millis(ms))))
            .collect::<Result<_, _>>()?,
        Err(_) => vec![None; addrs.len()],
    };
    if max_ages.len() != addrs.len() {
        return Err(format!("{MAX_AGE_ENV}: one age per address of {SERVER_ENV}").into());
    }
    let mcs = match std::env::var(MCS_ENV) {
        Ok(v) => Some(v.parse::<u32>()?),
        Err(_) => None,
    };
    let tls = match (std::env::var(TLS_CERT_ENV), std::env::var(TLS_KEY_ENV)) {
        (Ok(cert), Ok(key)) => Some(ServerTlsConfig::new().identity(Identity::from_pem(cert, key))),
        _ => None,
    };
    let delay = match std::env::var(DELAY_ENV) {
        Ok(v) => Duration::from_millis(v.parse::<u64>()?),
        Err(_) => Duration::ZERO,
    };
    let fail = std::env::var_os(FAIL_ENV).is_some();
    let settings = ServeSettings {
        mcs,
        tls,
        delay,
        fail,
    };
    // One thread, named `bench-server` so that profiles tell it from the load generator's
    // `load-client` threads, does all of the server's work.
    std::thread::Builder::new()
        .name("bench-server".into())
        .spawn(move || serve(&addrs, &max_ages, &settings))?
        .join()
        .map_err(|_| "server thread panicked")?
}

/// What every address of a server process shares.
#[derive(Clone, Debug)]
struct ServeSettings {
    mcs: Option<u32>,
    tls: Option<ServerTlsConfig>,
    delay: Duration,
    fail: bool,
}

fn serve(
    addrs: &[SocketAddr],
    max_ages: &[Option<Duration>],
    settings: &ServeSettings,
) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    rt.block_on(async move {
        let incomings = addrs
            .iter()
            .map(|addr| Ok(TcpIncoming::bind(*addr)?.with_nodelay(Some(true))))
            .collect::<Result<Vec<_>, BoxError>>()?;
        let bound = incomings
            .iter()
            .map(|incoming| Ok(incoming.local_addr()?.to_string()))
            .collect::<Result<Vec<_>, BoxError>>()?;
        let service = BenchEcho::default();
        let accepted = Arc::new(AtomicU64::new(0));
        let health = std::env::var_os(HEALTH_ENV).map(|_| Health {
            reporter: HealthReporter::new(),
            last_call: Arc::default(),
            runtime: handle,
        });
        let control_state = Control {
            requests: Arc::clone(&service.requests),
            accepted: Arc::clone(&accepted),
            health: health.clone(),
        };
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control(&control_state))?;
        {
            let mut out = io::stdout().lock();
            writeln!(out, "listening {}", bound.join(","))?;
            out.flush()?;
        }
        // One tonic `Server` per address, all on this one thread: each its own
        // `max_connection_age`.
        let mut servers = tokio::task::JoinSet::new();
        for (incoming, max_age) in incomings.into_iter().zip(max_ages) {
            let accepted = Arc::clone(&accepted);
            let incoming = tokio_stream::StreamExt::map(incoming, move |io| {
                if io.is_ok() {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
                io
            });
            servers.spawn(serve_one(
                incoming,
                *max_age,
                settings.clone(),
                service.clone(),
                health.clone(),
            ));
        }
        // A server ends only on an error; the process ends when stdin closes.
        while let Some(done) = servers.join_next().await {
            done.map_err(|_| "server task panicked")??;
        }
        Ok(())
    })
}

/// One address's server, until it fails.
async fn serve_one<I, IO, IE>(
    incoming: I,
    max_age: Option<Duration>,
    settings: ServeSettings,
    service: BenchEcho,
    health: Option<Health>,
) -> Result<(), BoxError>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<BoxError>,
{
    let ServeSettings {
        mcs,
        tls,
        delay,
        fail,
    } = settings;
    let mut builder = Server::builder().max_concurrent_streams(mcs);
    if let Some(age) = max_age {
        builder = builder.max_connection_age(age);
    }
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let echo = EchoServer::new(Delayed {
        inner: service,
        delay,
        fail,
    });
    match health {
        // Only S7's servers pay for the timestamp of each call.
        Some(health) => {
            let echo = Timed {
                inner: echo,
                last_call: health.last_call,
            };
            let health = HealthServer::new(HealthService::from_health_reporter(health.reporter));
            builder
                .add_service(echo)
                .add_service(health)
                .serve_with_incoming(incoming)
                .await?
        }
        None => {
            builder
                .add_service(echo)
                .serve_with_incoming(incoming)
                .await?
        }
    }
    Ok(())
}

/// The bench's echo service, answering every unary call `delay` later (S5's slow server),
/// or failing it at once with UNAVAILABLE (S6's failing server).
#[derive(Debug)]
struct Delayed {
    inner: BenchEcho,
    delay: Duration,
    fail: bool,
}

#[tonic::async_trait]
impl Echo for Delayed {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        if self.fail {
            // Counted as served (the share column), then refused.
            self.inner.requests.fetch_add(1, Ordering::Relaxed);
            return Err(Status::unavailable("failing on purpose (S6)"));
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.unary(request).await
    }

    type ServerStreamStream = <BenchEcho as Echo>::ServerStreamStream;

    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        self.inner.server_stream(request).await
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        self.inner.client_stream(request).await
    }

    type BidiStream = <BenchEcho as Echo>::BidiStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        self.inner.bidi(request).await
    }
}

/// The health service's statuses and the time of the last call, of an S7 server.
#[derive(Clone, Debug)]
struct Health {
    reporter: HealthReporter,
    /// µs since the Unix epoch when the last `Unary` call started.
    last_call: Arc<AtomicU64>,
    /// The server's runtime, on which the control thread sets a status.
    runtime: tokio::runtime::Handle,
}

/// What the control thread reads and changes.
#[derive(Debug)]
struct Control {
    requests: Arc<AtomicU64>,
    /// Connections accepted, over every address.
    accepted: Arc<AtomicU64>,
    health: Option<Health>,
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A service that notes when each of its calls starts.
#[derive(Clone, Debug)]
struct Timed<S> {
    inner: S,
    last_call: Arc<AtomicU64>,
}

impl<S: NamedService> NamedService for Timed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Timed<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        self.last_call.fetch_max(unix_micros(), Ordering::Relaxed);
        self.inner.call(request)
    }
}

/// Answers the bench's lines on stdin: `stats` with the request count, `accepted` with the
/// connections accepted; on an S7 server
/// `health STATUS` with the time of the change and the request count then, `last` with the
/// time of the last call and the request count. Exits the process at EOF.
fn control(state: &Control) {
    let stdin = io::stdin();
    // Bounded by the parent: it closes stdin when it is done (or dies).
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        let requests = || state.requests.load(Ordering::Relaxed);
        let answer = match (line, &state.health) {
            ("stats", _) => requests().to_string(),
            ("accepted", _) => state.accepted.load(Ordering::Relaxed).to_string(),
            ("last", Some(health)) => {
                format!(
                    "{} {}",
                    health.last_call.load(Ordering::Relaxed),
                    requests()
                )
            }
            (command, Some(health)) if command.starts_with("health ") => {
                let status = match &command["health ".len()..] {
                    "SERVING" => ServingStatus::Serving,
                    _ => ServingStatus::NotServing,
                };
                health
                    .runtime
                    .block_on(health.reporter.set_service_status("", status));
                format!("{} {}", unix_micros(), requests())
            }
            _ => format!("unknown command {line:?}"),
        };
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
    }
    std::process::exit(0);
}
