//! The echo servers: each runs in a process of its own (this binary re-executed), so that its
//! CPU can be read apart from the load generator's. [`ServerProc`] is the bench's handle on
//! one; [`run`] is what the re-executed binary does; the `/proc` readers measure CPU.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

use crate::common::echo::echo_server::{Echo, EchoServer};
use crate::common::echo::{EchoReply, EchoRequest, StreamRequest};
use crate::common::BenchEcho;
use crate::BoxError;

/// Set (to `ip:port`) when this binary runs as a server process.
pub(crate) const SERVER_ENV: &str = "TONIC_POOL_BENCH_SERVER";
/// The server's `max_concurrent_streams`, when set.
const MCS_ENV: &str = "TONIC_POOL_BENCH_MCS";
/// Milliseconds the server adds to every unary call (S5's slow server), when set.
const DELAY_ENV: &str = "TONIC_POOL_BENCH_DELAY_MS";
/// Linux reports process CPU times in clock ticks of 1/100 s (`USER_HZ`) on every common
/// architecture.
const CLOCK_TICKS_PER_SEC: u64 = 100;

// === the bench's side: server processes ===

/// A server process started by this bench; it exits when dropped (its stdin closes).
#[derive(Debug)]
pub(crate) struct ServerProc {
    pub(crate) addr: SocketAddr,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl ServerProc {
    /// Starts a server on `ip`; `delay_ms` (if not 0) is added to every unary call.
    pub(crate) fn spawn(
        ip: Ipv4Addr,
        max_concurrent_streams: Option<u32>,
        delay_ms: u32,
    ) -> Result<Self, BoxError> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .env(SERVER_ENV, format!("{ip}:0"))
            .env_remove(MCS_ENV)
            .env(DELAY_ENV, delay_ms.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(mcs) = max_concurrent_streams {
            command.env(MCS_ENV, mcs.to_string());
        }
        let mut child = command.spawn()?;
        let stdin = child.stdin.take().ok_or("server stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("server stdout")?);
        let mut server = Self {
            addr: SocketAddr::from((ip, 0)),
            child,
            stdin: Some(stdin),
            stdout,
        };
        // The server prints its address as soon as it listens (or exits on failure: EOF).
        let line = server.read_line()?;
        server.addr = line
            .strip_prefix("listening ")
            .ok_or_else(|| format!("server on {ip}: unexpected first line {line:?}"))?
            .parse()?;
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
        let stdin = self.stdin.as_mut().ok_or("server stdin closed")?;
        stdin.write_all(b"stats\n")?;
        stdin.flush()?;
        Ok(self.read_line()?.parse()?)
    }

    /// CPU time the server process has used so far.
    fn cpu(&self) -> Result<Duration, BoxError> {
        process_cpu(&format!("/proc/{}/stat", self.child.id()))
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

/// Serves the echo service on `addr` until stdin closes.
pub(crate) fn run(addr: &str) -> Result<(), BoxError> {
    let addr: SocketAddr = addr.parse()?;
    let mcs = match std::env::var(MCS_ENV) {
        Ok(v) => Some(v.parse::<u32>()?),
        Err(_) => None,
    };
    let delay = match std::env::var(DELAY_ENV) {
        Ok(v) => Duration::from_millis(v.parse::<u64>()?),
        Err(_) => Duration::ZERO,
    };
    // One thread, named `bench-server` so that profiles tell it from the load generator's
    // `load-client` threads, does all of the server's work.
    std::thread::Builder::new()
        .name("bench-server".into())
        .spawn(move || serve(addr, mcs, delay))?
        .join()
        .map_err(|_| "server thread panicked")?
}

fn serve(addr: SocketAddr, mcs: Option<u32>, delay: Duration) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let incoming = TcpIncoming::bind(addr)?.with_nodelay(Some(true));
        let bound = incoming.local_addr()?;
        let service = BenchEcho::default();
        let requests = Arc::clone(&service.requests);
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control(&requests))?;
        {
            let mut out = io::stdout().lock();
            writeln!(out, "listening {bound}")?;
            out.flush()?;
        }
        Server::builder()
            .max_concurrent_streams(mcs)
            .add_service(EchoServer::new(Delayed {
                inner: service,
                delay,
            }))
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    })
}

/// The bench's echo service, answering every unary call `delay` later (S5's slow server).
#[derive(Debug)]
struct Delayed {
    inner: BenchEcho,
    delay: Duration,
}

#[tonic::async_trait]
impl Echo for Delayed {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
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

/// Answers `stats` lines on stdin with the request count; exits the process at EOF.
fn control(requests: &AtomicU64) {
    let stdin = io::stdin();
    // Bounded by the parent: it closes stdin when it is done (or dies).
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "stats" {
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "{}", requests.load(Ordering::Relaxed));
            let _ = out.flush();
        }
    }
    std::process::exit(0);
}
