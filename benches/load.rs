//! Load scenarios S1–S4 of `BENCHMARKS.md`: a closed-loop load generator against echo servers
//! in separate processes, comparing a plain tonic `Channel`, tonic's `Channel::balance_channel`
//! and the [`Pool`] side by side in one run. Prints a markdown table and the bars.
//!
//! ```sh
//! cargo bench --bench load                                   # every scenario, ~5 minutes
//! LOAD_SCENARIOS=S1,S2 LOAD_SECS=3 LOAD_ROUNDS=3 cargo bench --bench load
//! ```
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `LOAD_SCENARIOS` | `S1,S2,S3,S4` | which scenarios to run, in this order |
//! | `LOAD_SECS` | 3 | measured seconds per mode and round |
//! | `LOAD_WARMUP_SECS` | 1 | unmeasured load before each measurement (connections warm) |
//! | `LOAD_ROUNDS` | 5 | rounds; each round runs every mode of the scenario once |
//! | `LOAD_CLIENT_THREADS` | 2 | tokio worker threads of the load generator |
//! | `LOAD_MODES` | all | only these modes, by kind or kind and count, e.g. `channel,pool1` (to profile one); ratios and bars need `channel` |
//! | `LOAD_POOL_SIZES` | — | replaces each scenario's `pool ×N` modes by these sizes, e.g. `1,2,4,8,16`; with three or more, the bench also writes `target/load/<scenario>-connections.svg`, req/s against connection count |
//!
//! Run without `--bench` (as `cargo test --benches` does) it is a smoke run: one round of
//! 0.3 s per mode, to check that the harness works, not to measure anything.
//!
//! # Method
//!
//! - **Servers** run in separate processes: this binary re-executes itself
//!   ([`std::env::current_exe`]) with `TONIC_POOL_BENCH_SERVER=ip:0` (and
//!   `TONIC_POOL_BENCH_MCS` for `max_concurrent_streams`). A server runs a tonic echo service
//!   on a **current-thread** tokio runtime (one thread does all its work), prints
//!   `listening <addr>` on stdout, answers `stats` on stdin with its request count, and exits
//!   when its stdin closes (so it never outlives the bench). Server CPU is read from
//!   `/proc/<pid>/stat`. Its thread is named `bench-server` and the load generator's
//!   `load-client`, so that `perf` can tell them apart.
//! - **Load**: C tasks on a multi-thread runtime (`LOAD_CLIENT_THREADS` workers), each with
//!   its own clone of a generated `EchoClient`, call `Unary` (32-byte payload, the scenario's
//!   server sleep) back to back for warm-up + D seconds. A call *started* inside the measured
//!   window is counted: its latency (µs, start to decoded reply) goes into a plain `Vec<u32>`,
//!   or its status code into the error counts. req/s = successful calls / D. Percentiles are
//!   nearest-rank over that round's sorted latencies.
//! - **CPU**: client CPU is `utime + stime` of this process (`/proc/self/stat`, clock ticks of
//!   1/100 s) at the window's start and end, divided by the calls in the window; likewise for
//!   the servers. Each server's share comes from its own request counter (`stats`) at the
//!   window's edges; "share min/max" is the least-served server's count over the most-served.
//!   The machine is shared, so each window also records how much CPU everything else used
//!   (busy time of `/proc/stat` minus this process and its servers), in cores: a run where
//!   that is not near 0 was disturbed.
//! - **Modes** alternate inside each round (A B C, A B C, …), each with fresh connections, so
//!   every mode sees the same machine conditions. A mode's figure is the **median over the
//!   rounds** (min–max alongside). The ratio is computed per round against that round's plain
//!   `Channel`, then the median (min–max) of those ratios is reported; the bars use the same
//!   paired ratios. The default is five short rounds rather than three long ones: a
//!   neighbour's burst then spoils one round of five and the medians hold.
//! - **Modes**: `channel` = one `Endpoint::connect()` (to the first server in S4);
//!   `balance ×N` = `Channel::balance_channel` with N endpoints per server under distinct keys
//!   (not `balance_list`, which keys by URI and would open one connection); `pool ×N` =
//!   `Pool` with `connections_per_endpoint(N)`, measured once every connection is Ready.
//!
//! | id | servers | C | sleep | modes |
//! |---|---|---|---|---|
//! | S1 | 127.0.0.2 | 1 | 0 | channel, balance ×1, pool ×1 |
//! | S2 | 127.0.0.2 | 64 | 0 | channel, balance ×1, pool ×1, pool ×4 |
//! | S3 | 127.0.0.2, `max_concurrent_streams` 100 | 1000 | 20 ms | channel, balance ×4, pool ×4 |
//! | S4 | 127.0.0.2/3/4 | 64 | 1 ms | channel (one server), balance ×1/addr, pool ×1/addr |

use std::collections::BTreeMap;
use std::error::Error;
use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::client::GrpcService;
use tonic::transport::channel::Change;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_pool::Pool;

mod common;

use common::echo::echo_client::EchoClient;
use common::echo::echo_server::EchoServer;
use common::{request, BenchEcho};

type BoxError = Box<dyn Error + Send + Sync>;

/// Set (to `ip:port`) when this binary runs as a server process.
const SERVER_ENV: &str = "TONIC_POOL_BENCH_SERVER";
/// The server's `max_concurrent_streams`, when set.
const MCS_ENV: &str = "TONIC_POOL_BENCH_MCS";
/// Linux reports process CPU times in clock ticks of 1/100 s (`USER_HZ`) on every common
/// architecture.
const CLOCK_TICKS_PER_SEC: u64 = 100;
/// Bound on every setup wait (server start, connections Ready).
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two measured runs, for the previous run's connections to close.
const SETTLE: Duration = Duration::from_millis(200);

fn main() {
    if let Ok(addr) = std::env::var(SERVER_ENV) {
        if let Err(e) = server::run(&addr) {
            eprintln!("bench server {addr}: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = run() {
        eprintln!("load bench failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), BoxError> {
    let bench = std::env::args().any(|a| a == "--bench");
    let settings = Settings::from_env(bench)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .thread_name("load-client")
        .enable_all()
        .build()?;
    let load_before = loadavg();
    let mut reports = Vec::new();
    for id in &settings.scenarios {
        let mut scenario = Scenario::by_id(id).ok_or_else(|| format!("unknown scenario {id}"))?;
        if let Some(sizes) = &settings.pool_sizes {
            let at = scenario
                .modes
                .iter()
                .position(|m| matches!(m, Mode::Pool(_)))
                .unwrap_or(scenario.modes.len());
            scenario.modes.retain(|m| !matches!(m, Mode::Pool(_)));
            for (i, &n) in sizes.iter().enumerate() {
                scenario.modes.insert(at + i, Mode::Pool(n));
            }
        }
        if let Some(kinds) = &settings.modes {
            scenario
                .modes
                .retain(|m| kinds.iter().any(|k| m.matches(k)));
            if scenario.modes.is_empty() {
                continue;
            }
        }
        reports.push(run_scenario(&rt, &scenario, &settings)?);
    }
    print_report(&settings, &reports, &load_before, &loadavg());
    for report in &reports {
        write_connections_plot(report)?;
    }
    Ok(())
}

/// With three or more `pool ×N` modes: an SVG of median req/s against N (min–max as bars),
/// with the plain `Channel`'s median as a dashed line, in `target/load/`.
fn write_connections_plot(report: &ScenarioReport) -> Result<(), BoxError> {
    let points: Vec<(usize, (f64, f64, f64))> = report
        .modes
        .iter()
        .enumerate()
        .filter_map(|(i, m)| match m {
            Mode::Pool(n) => Some((*n, stats(report.runs[i].iter().map(|r| r.rps)))),
            _ => None,
        })
        .collect();
    if points.len() < 3 {
        return Ok(());
    }
    let channel = report
        .has_baseline()
        .then(|| median(report.runs[0].iter().map(|r| r.rps)));
    let (w, h, left, bottom, top, right) = (640.0, 400.0, 70.0, 50.0, 40.0, 20.0);
    let max_n = points.iter().map(|p| p.0).max().unwrap_or(1) as f64;
    let max_y = points
        .iter()
        .map(|p| p.1 .2)
        .chain(channel)
        .fold(0.0_f64, f64::max)
        * 1.1;
    // Connection counts on a log2 axis: 1, 2, 4, … are evenly spaced.
    let x = |n: f64| left + (w - left - right) * (n.log2() / max_n.log2().max(1.0));
    let y = |v: f64| h - bottom - (h - bottom - top) * (v / max_y);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}: req/s against connections (pool ×N, median, min–max)</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
        w / 2.0,
        report.id,
        h - bottom,
        w - right,
        h - bottom,
        h - bottom,
    );
    // Round ticks: a step of 1, 2, 5 × a power of ten, about four of them.
    let raw = max_y / 4.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    for tick in 0..=8 {
        let v = step * f64::from(tick);
        if v > max_y {
            break;
        }
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}k</text>\n",
            left - 6.0,
            y(v) + 4.0,
            v / 1000.0
        );
    }
    let mut path = String::new();
    for (n, (med, lo, hi)) in &points {
        let px = x(*n as f64);
        svg += &format!(
            "<line x1=\"{px:.1}\" y1=\"{:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"steelblue\"/>\n\
             <circle cx=\"{px:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"steelblue\"/>\n\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{n}</text>\n\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"steelblue\">{:.1}k</text>\n",
            y(*lo),
            y(*hi),
            y(*med),
            h - bottom + 18.0,
            y(*hi) - 8.0,
            med / 1000.0
        );
        path += &format!(
            "{}{px:.1},{:.1}",
            if path.is_empty() { "M" } else { " L" },
            y(*med)
        );
    }
    svg += &format!("<path d=\"{path}\" fill=\"none\" stroke=\"steelblue\"/>\n");
    if let Some(c) = channel {
        svg += &format!(
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"gray\" stroke-dasharray=\"4 3\"/>\n\
             <text x=\"{1}\" y=\"{2:.1}\" text-anchor=\"end\" fill=\"gray\">channel {3:.1}k</text>\n",
            y(c),
            w - right,
            y(c) - 6.0,
            c / 1000.0
        );
    }
    svg += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">connections per endpoint (log scale)</text>\n</svg>\n",
        (left + w - right) / 2.0,
        h - 12.0
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/load");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{}-connections.svg", report.id));
    std::fs::write(&file, svg)?;
    println!("wrote {}", file.display());
    Ok(())
}

/// The machine's load averages (`/proc/loadavg`: 1, 5 and 15 minutes), to show how busy the
/// shared machine was around the run.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

// === settings and scenarios ===

/// What to run, from the `LOAD_*` environment variables.
#[derive(Debug)]
struct Settings {
    scenarios: Vec<String>,
    /// Only these modes (see [`Mode::matches`]), when set.
    modes: Option<Vec<String>>,
    warmup: Duration,
    measure: Duration,
    rounds: usize,
    client_threads: usize,
    smoke: bool,
    /// `LOAD_POOL_SIZES`: the `pool ×N` modes to run instead of each scenario's own.
    pool_sizes: Option<Vec<usize>>,
}

impl Settings {
    fn from_env(bench: bool) -> Result<Self, BoxError> {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> Result<T, BoxError> {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .map_err(|_| format!("{name}={v:?}: bad value").into()),
                Err(_) => Ok(default),
            }
        }
        let (secs, warmup, rounds) = if bench { (3.0, 1.0, 5) } else { (0.3, 0.2, 1) };
        let scenarios = var("LOAD_SCENARIOS", "S1,S2,S3,S4".to_owned())?
            .split(',')
            .map(|s| s.trim().to_uppercase())
            .filter(|s| !s.is_empty())
            .collect();
        let modes = std::env::var("LOAD_MODES").ok().map(|v| {
            v.split(',')
                .map(|s| s.trim().to_lowercase())
                .filter(|s| !s.is_empty())
                .collect()
        });
        let pool_sizes = match std::env::var("LOAD_POOL_SIZES") {
            Ok(v) => Some(
                v.split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<Vec<_>, _>>()
                    .ok()
                    .filter(|sizes| {
                        !sizes.is_empty() && sizes.iter().all(|&n| (1..=1024).contains(&n))
                    })
                    .ok_or_else(|| {
                        format!("LOAD_POOL_SIZES={v:?}: expected sizes in 1..=1024, e.g. 1,2,4")
                    })?,
            ),
            Err(_) => None,
        };
        let settings = Self {
            pool_sizes,
            scenarios,
            modes,
            measure: Duration::try_from_secs_f64(var("LOAD_SECS", secs)?)?,
            warmup: Duration::try_from_secs_f64(var("LOAD_WARMUP_SECS", warmup)?)?,
            rounds: var("LOAD_ROUNDS", rounds)?,
            client_threads: var("LOAD_CLIENT_THREADS", 2)?,
            smoke: !bench,
        };
        if settings.rounds == 0 || settings.client_threads == 0 || settings.measure.is_zero() {
            return Err("LOAD_ROUNDS, LOAD_CLIENT_THREADS and LOAD_SECS must be > 0".into());
        }
        Ok(settings)
    }
}

/// How the load generator reaches the servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// One tonic `Channel` (one connection) to the first server.
    Channel,
    /// `Channel::balance_channel` with this many endpoints (connections) per server.
    Balance(usize),
    /// `tonic_pool::Pool` with this many connections per server.
    Pool(usize),
    /// `tonic_pool::Pool` starting with one connection per server and allowed to grow to this
    /// many when its connections are full (stream-limit awareness).
    PoolGrow(usize),
}

impl Mode {
    /// Whether `LOAD_MODES`' `token` names this mode: its kind (`channel`, `balance`,
    /// `pool`) or its kind and connection count (`balance4`, `pool1`).
    fn matches(self, token: &str) -> bool {
        let (kind, n) = match self {
            Mode::Channel => ("channel", 1),
            Mode::Balance(n) => ("balance", n),
            Mode::Pool(n) => ("pool", n),
            Mode::PoolGrow(n) => ("grow", n),
        };
        token == kind || token == format!("{kind}{n}")
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Channel => f.write_str("channel"),
            Mode::Balance(n) => write!(f, "balance ×{n}"),
            Mode::Pool(n) => write!(f, "pool ×{n}"),
            Mode::PoolGrow(n) => write!(f, "pool 1→{n}"),
        }
    }
}

/// One load scenario of BENCHMARKS.md.
#[derive(Debug)]
struct Scenario {
    id: &'static str,
    /// Last octets of the servers' loopback addresses (127.0.0.x).
    servers: &'static [u8],
    concurrency: usize,
    sleep_ms: u32,
    max_concurrent_streams: Option<u32>,
    /// The modes; the first is the plain `Channel` baseline, the first `Pool` is the one the
    /// bars judge.
    modes: Vec<Mode>,
}

impl Scenario {
    /// The scenarios of BENCHMARKS.md.
    fn all() -> Vec<Self> {
        let scenario = |id, servers, concurrency, sleep_ms, max_concurrent_streams, modes| Self {
            id,
            servers,
            concurrency,
            sleep_ms,
            max_concurrent_streams,
            modes,
        };
        use Mode::{Balance, Channel, Pool, PoolGrow};
        vec![
            scenario("S1", &[2], 1, 0, None, vec![Channel, Balance(1), Pool(1)]),
            scenario(
                "S2",
                &[2],
                64,
                0,
                None,
                vec![Channel, Balance(1), Pool(1), Pool(4)],
            ),
            scenario(
                "S3",
                &[2],
                1000,
                20,
                Some(100),
                vec![Channel, Balance(4), Pool(4), Pool(16), PoolGrow(16)],
            ),
            scenario(
                "S4",
                &[2, 3, 4],
                64,
                1,
                None,
                vec![Channel, Balance(1), Pool(1)],
            ),
        ]
    }

    fn by_id(id: &str) -> Option<Self> {
        Self::all().into_iter().find(|s| s.id == id)
    }
}

// === server processes ===

/// A server process started by this bench; it exits when dropped (its stdin closes).
#[derive(Debug)]
struct ServerProc {
    addr: SocketAddr,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl ServerProc {
    fn spawn(ip: Ipv4Addr, max_concurrent_streams: Option<u32>) -> Result<Self, BoxError> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .env(SERVER_ENV, format!("{ip}:0"))
            .env_remove(MCS_ENV)
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
fn process_cpu(path: &str) -> Result<Duration, BoxError> {
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

/// The server side of the bench (this binary with `TONIC_POOL_BENCH_SERVER` set).
mod server {
    use super::*;

    use std::sync::atomic::{AtomicU64, Ordering};

    /// Serves the echo service on `addr` until stdin closes.
    pub(super) fn run(addr: &str) -> Result<(), BoxError> {
        let addr: SocketAddr = addr.parse()?;
        let mcs = match std::env::var(MCS_ENV) {
            Ok(v) => Some(v.parse::<u32>()?),
            Err(_) => None,
        };
        // One thread, named `bench-server` so that profiles tell it from the load generator's
        // `load-client` threads, does all of the server's work.
        std::thread::Builder::new()
            .name("bench-server".into())
            .spawn(move || serve(addr, mcs))?
            .join()
            .map_err(|_| "server thread panicked")?
    }

    fn serve(addr: SocketAddr, mcs: Option<u32>) -> Result<(), BoxError> {
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
}

// === load generation ===

/// The outcome of one mode in one round.
#[derive(Debug, Clone)]
struct RunResult {
    rps: f64,
    /// p50, p90, p99, max, in µs.
    p50: u32,
    p90: u32,
    p99: u32,
    max: u32,
    errors: BTreeMap<String, u64>,
    client_cpu_us: f64,
    server_cpu_us: f64,
    /// Least-served over most-served server, when there are several servers.
    share: Option<f64>,
    /// CPU used by everything else on the machine during the window, in cores (the machine is
    /// shared: a busy neighbour makes a run unreliable).
    other_cores: f64,
}

/// What each load task brings back.
#[derive(Debug, Default)]
struct TaskTally {
    latencies: Vec<u32>,
    errors: BTreeMap<String, u64>,
}

fn run_scenario(
    rt: &tokio::runtime::Runtime,
    scenario: &Scenario,
    settings: &Settings,
) -> Result<ScenarioReport, BoxError> {
    let mut servers = scenario
        .servers
        .iter()
        .map(|&last| {
            ServerProc::spawn(
                Ipv4Addr::new(127, 0, 0, last),
                scenario.max_concurrent_streams,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut runs: Vec<Vec<RunResult>> = vec![Vec::new(); scenario.modes.len()];
    for round in 0..settings.rounds {
        for (i, &mode) in scenario.modes.iter().enumerate() {
            let result = rt.block_on(run_mode(scenario, mode, settings, &mut servers))?;
            eprintln!(
                "[{} round {}/{}] {:<10} {:>9.0} req/s  p50 {:>8}  p99 {:>8}  client {:>5.1} µs/req  \
                 errors {}  other processes {:.2} cores",
                scenario.id,
                round + 1,
                settings.rounds,
                mode.to_string(),
                result.rps,
                fmt_us(result.p50),
                fmt_us(result.p99),
                result.client_cpu_us,
                fmt_errors(&result.errors),
                result.other_cores,
            );
            runs[i].push(result);
            std::thread::sleep(SETTLE);
        }
    }
    Ok(ScenarioReport {
        id: scenario.id,
        modes: scenario.modes.clone(),
        runs,
    })
}

/// Connects in `mode`, drives the load, closes.
async fn run_mode(
    scenario: &Scenario,
    mode: Mode,
    settings: &Settings,
    servers: &mut [ServerProc],
) -> Result<RunResult, BoxError> {
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    match mode {
        Mode::Channel => {
            let channel = Endpoint::from_shared(format!("http://{}", addrs[0]))?
                .connect_timeout(SETUP_TIMEOUT)
                .connect()
                .await?;
            drive(EchoClient::new(channel), scenario, settings, servers).await
        }
        Mode::Balance(n) => {
            let (channel, changes) = Channel::balance_channel::<usize>(addrs.len() * n);
            for (key, addr) in addrs
                .iter()
                .flat_map(|a| std::iter::repeat_n(a, n))
                .enumerate()
            {
                let endpoint =
                    Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(SETUP_TIMEOUT);
                changes.send(Change::Insert(key, endpoint)).await?;
            }
            // balance_channel connects in the background while it is polled: the warm-up
            // makes sure every endpoint is connected before the measurement.
            let result = drive(EchoClient::new(channel), scenario, settings, servers).await;
            drop(changes);
            result
        }
        Mode::Pool(n) => {
            let target = static_target(&addrs);
            let pool = Pool::builder(target).connections_per_endpoint(n).build()?;
            let all = n * addrs.len();
            if !pool
                .wait_until(SETUP_TIMEOUT, |s| s.ready_connections() == all)
                .await
            {
                return Err(
                    format!("pool: {all} connections not Ready: {:?}", pool.snapshot()).into(),
                );
            }
            let result = drive(EchoClient::new(pool.clone()), scenario, settings, servers).await;
            pool.close().await?;
            result
        }
        Mode::PoolGrow(max) => {
            let target = static_target(&addrs);
            let pool = Pool::builder(target)
                .connections_per_endpoint(1)
                .max_connections_per_endpoint(max)
                .build()?;
            pool.wait_ready(SETUP_TIMEOUT).await?;
            // The warm-up is where it grows; the measured window shows the size it found.
            let result = drive(EchoClient::new(pool.clone()), scenario, settings, servers).await;
            let grown: usize = pool
                .snapshot()
                .endpoints
                .iter()
                .map(|e| e.connections.len())
                .sum();
            eprintln!("  pool 1→{max}: grew to {grown} connection(s)");
            pool.close().await?;
            result
        }
    }
}

/// `static:///a,b,…` for the servers' addresses.
fn static_target(addrs: &[SocketAddr]) -> String {
    let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    format!("static:///{}", list.join(","))
}

/// Runs the closed loop: `concurrency` tasks, warm-up, then the measured window.
async fn drive<T>(
    client: EchoClient<T>,
    scenario: &Scenario,
    settings: &Settings,
    servers: &mut [ServerProc],
) -> Result<RunResult, BoxError>
where
    T: GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Future: Send,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let begin = Instant::now();
    let window_start = begin + settings.warmup;
    let window_end = window_start + settings.measure;
    let sleep_ms = scenario.sleep_ms;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..scenario.concurrency {
        let mut client = client.clone();
        tasks.spawn(async move {
            let mut tally = TaskTally::default();
            // Bounded by the clock: no call starts after the window ends.
            loop {
                let started = Instant::now();
                if started >= window_end {
                    break;
                }
                let outcome = client.unary(request(sleep_ms)).await;
                if started < window_start {
                    continue;
                }
                match outcome {
                    Ok(reply) => {
                        drop(reply);
                        let us = started.elapsed().as_micros();
                        tally.latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
                    }
                    Err(status) => {
                        *tally
                            .errors
                            .entry(format!("{:?}", status.code()))
                            .or_default() += 1;
                    }
                }
            }
            tally
        });
    }
    drop(client);

    // This future runs on the thread that called `block_on`, not on a runtime worker, so the
    // short blocking reads of the servers' counters below do not stall the load.
    tokio::time::sleep_until(window_start.into()).await;
    let machine0 = machine_busy()?;
    let cpu0 = process_cpu("/proc/self/stat")?;
    let (server_cpu0, requests0) = server_counters(servers)?;
    tokio::time::sleep_until(window_end.into()).await;
    let machine1 = machine_busy()?;
    let cpu1 = process_cpu("/proc/self/stat")?;
    let (server_cpu1, requests1) = server_counters(servers)?;
    let ours = cpu1.saturating_sub(cpu0) + server_cpu1.saturating_sub(server_cpu0);
    let other_cores = machine1
        .saturating_sub(machine0)
        .saturating_sub(ours)
        .as_secs_f64()
        / settings.measure.as_secs_f64();

    let mut latencies = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        let tally = done?;
        latencies.extend(tally.latencies);
        for (code, n) in tally.errors {
            *errors.entry(code).or_default() += n;
        }
    }
    latencies.sort_unstable();
    let calls = latencies.len() as u64 + errors.values().sum::<u64>();
    let per_call = |cpu: Duration| cpu.as_secs_f64() * 1e6 / calls.max(1) as f64;
    let served: Vec<u64> = requests1
        .iter()
        .zip(&requests0)
        .map(|(b, a)| b.saturating_sub(*a))
        .collect();
    let share = (served.len() > 1).then(|| {
        let max = served.iter().copied().max().unwrap_or(0);
        let min = served.iter().copied().min().unwrap_or(0);
        if max == 0 {
            0.0
        } else {
            min as f64 / max as f64
        }
    });
    Ok(RunResult {
        rps: latencies.len() as f64 / settings.measure.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p90: percentile(&latencies, 0.90),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or(0),
        errors,
        client_cpu_us: per_call(cpu1.saturating_sub(cpu0)),
        server_cpu_us: per_call(server_cpu1.saturating_sub(server_cpu0)),
        share,
        other_cores,
    })
}

/// CPU time the whole machine has been busy (every core, every process: the `cpu` line of
/// `/proc/stat`, user + nice + system + irq + softirq + steal).
fn machine_busy() -> Result<Duration, BoxError> {
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
fn server_counters(servers: &mut [ServerProc]) -> Result<(Duration, Vec<u64>), BoxError> {
    let mut cpu = Duration::ZERO;
    let mut requests = Vec::with_capacity(servers.len());
    for server in servers {
        cpu += server.cpu()?;
        requests.push(server.requests()?);
    }
    Ok((cpu, requests))
}

/// Nearest-rank percentile of sorted values (0 when empty).
fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// === report ===

/// Every run of one scenario: `runs[mode][round]`.
#[derive(Debug)]
struct ScenarioReport {
    id: &'static str,
    modes: Vec<Mode>,
    runs: Vec<Vec<RunResult>>,
}

impl ScenarioReport {
    /// Whether the plain `Channel` baseline ran (it is then mode 0); see `LOAD_MODES`.
    fn has_baseline(&self) -> bool {
        self.modes.first() == Some(&Mode::Channel)
    }

    /// Per-round ratios of `f(mode) / f(channel)`.
    fn ratios(&self, mode: usize, f: impl Fn(&RunResult) -> f64) -> Vec<f64> {
        self.runs[mode]
            .iter()
            .zip(&self.runs[0])
            .map(|(m, base)| f(m) / f(base))
            .collect()
    }

    /// The first pool mode: the one the bars judge.
    fn pool(&self) -> Option<usize> {
        self.modes.iter().position(|m| matches!(m, Mode::Pool(_)))
    }
}

/// Median, min and max (NaN-free input assumed; empty gives zeros).
fn stats(values: impl IntoIterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    };
    (median, v[0], v[v.len() - 1])
}

fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    stats(values).0
}

fn fmt_us(us: u32) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", f64::from(us) / 1000.0)
    } else {
        format!("{us} µs")
    }
}

fn fmt_errors(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "0".to_owned();
    }
    errors
        .iter()
        .map(|(code, n)| format!("{code}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_report(settings: &Settings, reports: &[ScenarioReport], before: &str, after: &str) {
    println!();
    if settings.smoke {
        println!("_Smoke run (no `--bench`): numbers mean nothing._\n");
    }
    println!(
        "Load: {} round(s) × ({:.1} s warm-up + {:.1} s measured) per mode; client runtime {} \
         worker thread(s); each server one current-thread process. Medians over rounds \
         (min–max); ratio = per-round req/s over the same round's plain `channel`. Load \
         average (1/5/15 min) before: {before}; after: {after}.\n",
        settings.rounds,
        settings.warmup.as_secs_f64(),
        settings.measure.as_secs_f64(),
        settings.client_threads,
    );
    println!(
        "| scenario | mode | req/s median (min–max) | ratio | p50 | p90 | p99 | max | errors \
         | client CPU µs/req | server CPU µs/req | share min/max | other processes (cores) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for report in reports {
        for (i, mode) in report.modes.iter().enumerate() {
            let runs = &report.runs[i];
            let (rps, rps_min, rps_max) = stats(runs.iter().map(|r| r.rps));
            let (ratio, ratio_min, ratio_max) = stats(report.ratios(i, |r| r.rps));
            let lat =
                |f: fn(&RunResult) -> u32| median(runs.iter().map(|r| f64::from(f(r)))) as u32;
            let mut errors = BTreeMap::new();
            for r in runs {
                for (code, n) in &r.errors {
                    *errors.entry(code.clone()).or_default() += n;
                }
            }
            let (other, _, other_max) = stats(runs.iter().map(|r| r.other_cores));
            let other = format!("{other:.2} (max {other_max:.2})");
            let share = if runs.iter().all(|r| r.share.is_some()) {
                let (m, lo, hi) = stats(runs.iter().filter_map(|r| r.share));
                format!("{m:.2} ({lo:.2}–{hi:.2})")
            } else {
                "—".to_owned()
            };
            println!(
                "| {} | {} | {:.0} ({:.0}–{:.0}) | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {} | {} |",
                report.id,
                mode,
                rps,
                rps_min,
                rps_max,
                if !report.has_baseline() {
                    "—".to_owned()
                } else if i == 0 {
                    "1.00×".to_owned()
                } else {
                    format!("{ratio:.2}× ({ratio_min:.2}–{ratio_max:.2})")
                },
                fmt_us(lat(|r| r.p50)),
                fmt_us(lat(|r| r.p90)),
                fmt_us(lat(|r| r.p99)),
                fmt_us(lat(|r| r.max)),
                fmt_errors(&errors),
                median(runs.iter().map(|r| r.client_cpu_us)),
                median(runs.iter().map(|r| r.server_cpu_us)),
                share,
                other,
            );
        }
    }
    print_bars(reports);
}

/// The bars of BENCHMARKS.md for the first pool mode of each scenario, from paired ratios.
fn print_bars(reports: &[ScenarioReport]) {
    println!("\nBars (pool vs the same round's plain `channel`; median (min–max) of rounds):\n");
    println!("| scenario | bar | measured | holds? |");
    println!("|---|---|---|---|");
    let verdict = |ok: bool| if ok { "yes" } else { "**no**" };
    let ratio = |(m, lo, hi): (f64, f64, f64)| format!("{m:.3}× ({lo:.2}–{hi:.2})");
    for report in reports {
        let Some(p) = report.pool().filter(|_| report.has_baseline()) else {
            continue;
        };
        let mode = report.modes[p];
        let rps = stats(report.ratios(p, |r| r.rps));
        match report.id {
            "S1" => {
                let p50 = stats(report.ratios(p, |r| f64::from(r.p50)));
                println!(
                    "| S1 | {mode} req/s ≥ 1.0× | {} | {} |",
                    ratio(rps),
                    verdict(rps.0 >= 1.0)
                );
                println!(
                    "| S1 | {mode} p50 ≤ 1.0× | {} | {} |",
                    ratio(p50),
                    verdict(p50.0 <= 1.0)
                );
            }
            "S2" => {
                let cpu = stats(report.ratios(p, |r| r.client_cpu_us));
                println!(
                    "| S2 | {mode} req/s ≥ 1.05× | {} | {} |",
                    ratio(rps),
                    verdict(rps.0 >= 1.05)
                );
                println!(
                    "| S2 | {mode} client CPU/req ≤ 0.95× | {} | {} |",
                    ratio(cpu),
                    verdict(cpu.0 <= 0.95)
                );
            }
            "S3" => {
                if let Some(g) = report
                    .modes
                    .iter()
                    .position(|m| matches!(m, Mode::PoolGrow(_)))
                {
                    let grow = stats(report.runs[g].iter().map(|r| r.rps));
                    let median_rps = |report: &ScenarioReport, mode: Mode| {
                        let i = report.modes.iter().position(|m| *m == mode)?;
                        Some(median(report.runs[i].iter().map(|r| r.rps)))
                    };
                    let versus = |what: &str, reference: Option<f64>, goal: Option<f64>| {
                        if let Some(reference) = reference {
                            let r = grow.0 / reference;
                            println!(
                                "| S3 | {} req/s vs {what} ({reference:.0} req/s){} | {r:.3}× ({:.2}–{:.2}) | {} |",
                                report.modes[g],
                                goal.map_or(String::new(), |g| format!(": goal ≥ {g}×")),
                                grow.1 / reference,
                                grow.2 / reference,
                                goal.map_or("—", |g| verdict(r >= g)),
                            );
                        }
                    };
                    let s2 = reports.iter().find(|r| r.id == "S2");
                    versus(
                        "S2's pool ×1, this run",
                        s2.and_then(|s2| median_rps(s2, Mode::Pool(1))),
                        Some(0.8),
                    );
                    versus(
                        "S2's channel, this run",
                        s2.and_then(|s2| median_rps(s2, Mode::Channel)),
                        None,
                    );
                    versus(
                        "a fixed pool ×16, this run",
                        median_rps(report, Mode::Pool(16)),
                        None,
                    );
                    let scenario = Scenario::by_id("S3").expect("S3 exists");
                    versus(
                        "the closed-loop ceiling, callers / server sleep",
                        Some(scenario.concurrency as f64 * 1000.0 / f64::from(scenario.sleep_ms)),
                        None,
                    );
                }
                // Every fixed size of the run, not only the first (see `LOAD_POOL_SIZES`).
                // BENCHMARKS.md asks for 0.95·N× only "until CPU is the limit"; a size whose
                // bar lies above the closed-loop ceiling (callers / server sleep) cannot be
                // judged by it, and says so instead of failing.
                let scenario = Scenario::by_id("S3").expect("S3 exists");
                let ceiling = scenario.concurrency as f64 * 1000.0 / f64::from(scenario.sleep_ms);
                let channel = median(report.runs[0].iter().map(|r| r.rps));
                for (i, m) in report.modes.iter().enumerate() {
                    let Mode::Pool(n) = *m else { continue };
                    let rps = stats(report.ratios(i, |r| r.rps));
                    let bar = 0.95 * n as f64;
                    let judged = if bar * channel > ceiling {
                        format!(
                            "— ({bar:.2}× the channel is {:.0} req/s, above the ceiling of {ceiling:.0})",
                            bar * channel
                        )
                    } else {
                        verdict(rps.0 >= bar).to_owned()
                    };
                    println!("| S3 | {m} req/s ≥ {bar:.2}× | {} | {judged} |", ratio(rps));
                }
            }
            _ => {
                let runs = &report.runs[p];
                let share = stats(runs.iter().map(|r| r.share.unwrap_or(0.0)));
                let errors: u64 = runs.iter().flat_map(|r| r.errors.values()).sum();
                println!(
                    "| {} | {mode} share min/max ≥ 0.9 | {:.2} ({:.2}–{:.2}) | {} |",
                    report.id,
                    share.0,
                    share.1,
                    share.2,
                    verdict(share.0 >= 0.9)
                );
                println!(
                    "| {} | {mode} no errors | {errors} | {} |",
                    report.id,
                    verdict(errors == 0)
                );
            }
        }
    }
}
