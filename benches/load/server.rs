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
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::common::echo::echo_server::EchoServer;
use crate::common::BenchEcho;
use crate::BoxError;

/// Set (to `ip:port`) when this binary runs as a server process.
pub(crate) const SERVER_ENV: &str = "TONIC_POOL_BENCH_SERVER";
/// The server's `max_concurrent_streams`, when set.
const MCS_ENV: &str = "TONIC_POOL_BENCH_MCS";
/// The server's TLS certificate and key (PEM), when it serves TLS.
const TLS_CERT_ENV: &str = "TONIC_POOL_BENCH_TLS_CERT";
const TLS_KEY_ENV: &str = "TONIC_POOL_BENCH_TLS_KEY";
/// The name the TLS scenario's certificate is for; clients verify it.
pub(crate) const TLS_NAME: &str = "bench.test";
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
    pub(crate) addr: SocketAddr,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl ServerProc {
    pub(crate) fn spawn(
        ip: Ipv4Addr,
        max_concurrent_streams: Option<u32>,
        tls: Option<&BenchTls>,
    ) -> Result<Self, BoxError> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .env(SERVER_ENV, format!("{ip}:0"))
            .env_remove(MCS_ENV)
            .env_remove(TLS_CERT_ENV)
            .env_remove(TLS_KEY_ENV)
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
    let tls = match (std::env::var(TLS_CERT_ENV), std::env::var(TLS_KEY_ENV)) {
        (Ok(cert), Ok(key)) => Some(ServerTlsConfig::new().identity(Identity::from_pem(cert, key))),
        _ => None,
    };
    // One thread, named `bench-server` so that profiles tell it from the load generator's
    // `load-client` threads, does all of the server's work.
    std::thread::Builder::new()
        .name("bench-server".into())
        .spawn(move || serve(addr, mcs, tls))?
        .join()
        .map_err(|_| "server thread panicked")?
}

fn serve(addr: SocketAddr, mcs: Option<u32>, tls: Option<ServerTlsConfig>) -> Result<(), BoxError> {
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
        let mut builder = Server::builder().max_concurrent_streams(mcs);
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        builder
            .add_service(EchoServer::new(service))
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    })
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
