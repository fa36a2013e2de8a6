//! Scale (issue #15): how the pool's start-up, calls, churn and `close()` grow from 250 to
//! 16 000 connections, against echo servers in separate processes. Prints markdown tables
//! and the issue's goals with a verdict each.
//!
//! ```sh
//! cargo bench --bench scale
//! SCALE_CONNECTIONS=250,1000 SCALE_ROUNDS=3 cargo bench --bench scale
//! ```
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `SCALE_SERVERS` | 250 | addresses (servers), on 127.1.x.y; the churn servers on 127.2.x.y |
//! | `SCALE_CONNECTIONS` | `250,1000,4000,16000` | pool sizes, each a multiple of `SCALE_SERVERS` (`connections_per_endpoint` = size / servers, ≤ 1024) |
//! | `SCALE_ROUNDS` | 3 | rounds; each round runs the baseline, every size and the churn once |
//! | `SCALE_CALL_SECS` | 3 | measured seconds of the calls phase |
//! | `SCALE_WARMUP_SECS` | 1 | unmeasured calls before it |
//! | `SCALE_CONCURRENCY` | 64 | concurrent callers |
//! | `SCALE_CHURN_CONNECTIONS` | 1000 | pool size of the churn phase (0: no churn phase) |
//! | `SCALE_CHURN_RATE` | 100 | connections the churn servers recycle per second, together |
//! | `SCALE_CHURN_SECS` | size / rate (10) | measured seconds of the churn phase; longer than size / rate reaches the second recycling cycle |
//! | `SCALE_READY_TIMEOUT_SECS` | 60 | bound on start-up; a size that is not all Ready by then is reported as timed out |
//! | `SCALE_CLIENT_THREADS` | 2 | worker threads of the client runtime |
//! | `SCALE_SERVER_PROCS` | 2 | processes the servers are spread over (each ≤ 20 000 fds) |
//!
//! Run without `--bench` (as `cargo test --benches` does) it is a smoke run: 8 servers, sizes
//! 8 and 32, one round of 0.3 s windows — to check that the harness works, not to measure.
//!
//! # Method
//!
//! - **Servers**: the load bench's server processes (`load/server.rs`: this binary
//!   re-executed, a current-thread runtime per process), here with many addresses per process
//!   (one tonic `Server` per address, ports chosen by the OS, reported back on stdout), spread
//!   over `SCALE_SERVER_PROCS` processes: 16 000 client sockets and 16 000 server sockets do
//!   not fit the 20 000 fds of one process.
//! - **Start-up**: a pool over `static:///` of every address with
//!   `connections_per_endpoint(size / servers)`, built with `connect_lazily(true)` so that
//!   building it starts nothing; the clock and the CPU readings start at `Pool::connect()`.
//!   "All Ready" is counted from `Pool::events()` on a thread of its own (connection id →
//!   Ready or not; O(1) per event), not with `wait_until`, which takes a snapshot per change
//!   and would add O(n) per change to what is measured. When the events lag, the waiter
//!   recounts from one snapshot; when its count reaches the size, one snapshot confirms it.
//!   The waiter thread's CPU (`/proc/thread-self/schedstat`) is subtracted from the
//!   process's, and its events, lost events and snapshots are printed. Client CPU is the sum
//!   of `/proc/self/task/*/schedstat` (ns) — a 250-connection start-up lasts tens of ms,
//!   below the 10 ms ticks of `/proc/self/stat`; server CPU likewise from the server
//!   processes' `/proc/<pid>/task/*/schedstat`.
//! - **Calls**: `SCALE_CONCURRENCY` callers, each its own clone of a generated `EchoClient`
//!   over the pool, call `Unary` (32 bytes, no sleep) back to back: warm-up, then the
//!   measured window. req/s, client and server CPU per call (`/proc/<pid>/stat`), write
//!   system calls per call (`syscw` of `/proc/self/io`: write, writev; socket reads are
//!   recv(2), which it does not count). Failed calls are counted over warm-up and window.
//!   The **baseline** of each round is the same load over one address × 4 connections; the
//!   ratio is per round against it.
//! - **Churn**: a second set of servers whose addresses send GOAWAY to each connection at a
//!   fixed age (tonic's `max_connection_age`), address i of n at A × (1 + i / n) with
//!   A = size / `SCALE_CHURN_RATE`: the connections open together at start-up, so between A
//!   and 2A the addresses recycle theirs one after the other, evenly, at that rate. After a
//!   warm-up of A the calls phase runs for `SCALE_CHURN_SECS` (A by default, the first
//!   cycle, where the rate is even); replacements per second are the
//!   connections the servers accepted in the window; the pool's GOAWAY count and its
//!   transparently retried attempts are printed beside it. Ratio: req/s against the no-churn calls phase of the same size in the same
//!   round, when that size is measured.
//! - **close()**: its wall time and result, bounded by 60 s; then the client's and the
//!   servers' open fds are compared with before the pool was built (waited for up to 5 s):
//!   anything left is a leak.
//! - Each figure is the median over the rounds with min–max; the machine's other load is
//!   recorded per phase, in cores.
//!
//! Every wait is bounded; a size whose start-up times out is reported as such and its calls
//! skipped. The bench exits non-zero after printing if a start-up timed out, a close failed,
//! any call failed or anything leaked.
//!
//! # Code
//!
//! - `main.rs` (this file): settings, the rounds, the tables;
//! - `measure.rs`: start-up, calls, close and their `/proc` readings;
//! - `../load/server.rs` (shared with the load bench): the server processes.

use std::error::Error;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

// The shared bench code lives beside the bench targets, not inside this one's directory.
#[path = "../common/mod.rs"]
mod common;
mod measure;
// The load bench's server processes and `/proc` readers; this bench uses part of them.
#[allow(dead_code)]
#[path = "../load/server.rs"]
mod server;

use common::stats;
use measure::{Calls, Close, StartUp};
use server::ServerProc;

type BoxError = Box<dyn Error + Send + Sync>;

/// Addresses per 127.x.y.0/24 block (127.x.y.1 ..= 127.x.y.250).
const PER_BLOCK: usize = 250;
/// The file descriptors this bench leaves to each process beyond its connections.
const FD_MARGIN: usize = 500;

fn main() {
    if let Ok(addrs) = std::env::var(server::SERVER_ENV) {
        if let Err(e) = server::run(&addrs) {
            eprintln!("scale bench server: {e}");
            std::process::exit(1);
        }
        return;
    }
    match run() {
        Ok(problems) if problems.is_empty() => {}
        Ok(problems) => {
            eprintln!("scale bench: the run found problems:");
            for problem in problems {
                eprintln!("- {problem}");
            }
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("scale bench failed: {e}");
            std::process::exit(1);
        }
    }
}

/// What to run, from the `SCALE_*` environment variables.
#[derive(Debug)]
struct Settings {
    servers: usize,
    sizes: Vec<usize>,
    rounds: usize,
    window: Duration,
    warmup: Duration,
    concurrency: usize,
    churn_size: usize,
    churn_rate: f64,
    churn_window: Duration,
    ready_timeout: Duration,
    client_threads: usize,
    server_procs: usize,
}

impl Settings {
    fn from_env(bench: bool) -> Result<Self, BoxError> {
        use common::env_var as var;
        let secs = |name: &str, default: f64| -> Result<Duration, BoxError> {
            Ok(Duration::try_from_secs_f64(var(name, default)?)
                .map_err(|e| format!("{name}: {e}"))?)
        };
        let (servers, sizes, rounds, window, warmup, churn_size) = if bench {
            (250, "250,1000,4000,16000", 3, 3.0, 1.0, 1000)
        } else {
            (8, "8,32", 1, 0.3, 0.2, 32)
        };
        let servers: usize = var("SCALE_SERVERS", servers)?;
        let sizes_text = var("SCALE_CONNECTIONS", sizes.to_owned())?;
        let sizes = sizes_text
            .split(',')
            .map(|s| s.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| format!("SCALE_CONNECTIONS={sizes_text:?}: expected e.g. 250,1000"))?;
        let churn_size = var("SCALE_CHURN_CONNECTIONS", churn_size)?;
        let churn_rate: f64 = var("SCALE_CHURN_RATE", 100.0)?;
        if !(churn_rate > 0.0 && churn_rate.is_finite()) {
            return Err("SCALE_CHURN_RATE must be > 0".into());
        }
        let settings = Self {
            churn_size,
            churn_rate,
            servers,
            sizes,
            rounds: var("SCALE_ROUNDS", rounds)?,
            window: secs("SCALE_CALL_SECS", window)?,
            warmup: secs("SCALE_WARMUP_SECS", warmup)?,
            concurrency: var("SCALE_CONCURRENCY", 64)?,
            churn_window: match std::env::var("SCALE_CHURN_SECS") {
                Ok(_) => secs("SCALE_CHURN_SECS", 0.0)?,
                // The first recycling cycle, [A, 2A] (see `churn_ages`).
                Err(_) => Duration::try_from_secs_f64(churn_size as f64 / churn_rate)
                    .map_err(|e| format!("SCALE_CHURN_RATE: {e}"))?,
            },
            ready_timeout: secs("SCALE_READY_TIMEOUT_SECS", 60.0)?,
            client_threads: var("SCALE_CLIENT_THREADS", 2)?,
            server_procs: var("SCALE_SERVER_PROCS", 2)?,
        };
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), BoxError> {
        if self.servers == 0 || self.servers > PER_BLOCK * 256 {
            return Err(format!("SCALE_SERVERS must be 1..={}", PER_BLOCK * 256).into());
        }
        if self.rounds == 0 || self.concurrency == 0 || self.client_threads == 0 {
            return Err("SCALE_ROUNDS, SCALE_CONCURRENCY, SCALE_CLIENT_THREADS must be > 0".into());
        }
        if self.server_procs == 0 || self.server_procs > self.servers {
            return Err("SCALE_SERVER_PROCS must be 1..=SCALE_SERVERS".into());
        }
        let no_churn_window = self.churn_size > 0 && self.churn_window.is_zero();
        if self.window.is_zero() || no_churn_window || self.ready_timeout.is_zero() {
            return Err(
                "SCALE_CALL_SECS, SCALE_CHURN_SECS, SCALE_READY_TIMEOUT_SECS must be > 0".into(),
            );
        }
        let churn = (self.churn_size > 0).then_some(self.churn_size);
        for size in self.sizes.iter().copied().chain(churn) {
            let per_address = size / self.servers;
            if size % self.servers != 0 || !(1..=1024).contains(&per_address) {
                return Err(format!(
                    "pool size {size}: must be {} × 1..=1024 (SCALE_SERVERS × connections per address)",
                    self.servers
                )
                .into());
            }
        }
        // Every connection is a socket on both sides: check the fd limits before starting.
        let largest = self.sizes.iter().copied().chain(churn).max().unwrap_or(0);
        let limit = fd_limit()?;
        let per_proc = largest.div_ceil(self.server_procs) + self.servers + FD_MARGIN;
        if largest + FD_MARGIN > limit || per_proc > limit {
            return Err(format!(
                "{largest} connections need {} fds in the client and {per_proc} in each server \
                 process; the limit is {limit} (raise SCALE_SERVER_PROCS or `ulimit -n`)",
                largest + FD_MARGIN
            )
            .into());
        }
        Ok(())
    }

    fn per_address(&self, size: usize) -> usize {
        size / self.servers
    }
}

/// One pool's figures in one round: a size, or the churn phase.
#[derive(Debug, Clone)]
struct SizeRun {
    start_up: StartUp,
    /// `None` when the start-up timed out.
    calls: Option<Calls>,
    /// Connections in the pool after the calls (the size expected: no growth, no leak).
    connections_after: usize,
    close: Close,
}

/// Everything one round measured.
#[derive(Debug, Default)]
struct Round {
    baseline: Option<Calls>,
    sizes: Vec<SizeRun>,
    churn: Option<SizeRun>,
}

fn run() -> Result<Vec<String>, BoxError> {
    let bench = std::env::args().any(|a| a == "--bench");
    let settings = Settings::from_env(bench)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .thread_name("scale-client")
        .enable_all()
        .build()?;
    let date_before = date();
    let load_before = loadavg();
    let mut plain = spawn_servers(&settings, 1, None)?;
    let churn_ages = churn_ages(&settings);
    let mut churny = if settings.churn_size > 0 {
        spawn_servers(&settings, 2, Some(&churn_ages))?
    } else {
        Vec::new()
    };
    let plain_addrs: Vec<SocketAddr> = plain.iter().flat_map(|s| s.addrs.clone()).collect();
    let churn_addrs: Vec<SocketAddr> = churny.iter().flat_map(|s| s.addrs.clone()).collect();
    eprintln!(
        "scale: {} servers in {} processes{}; sizes {:?}; {} round(s)",
        settings.servers,
        settings.server_procs,
        if churny.is_empty() {
            String::new()
        } else {
            format!(
                ", churn servers with connection ages {:.1}–{:.1} s",
                churn_ages[0].as_secs_f64(),
                churn_ages[churn_ages.len() - 1].as_secs_f64()
            )
        },
        settings.sizes,
        settings.rounds
    );
    let mut rounds = Vec::new();
    for r in 0..settings.rounds {
        let tag = format!("round {}/{}", r + 1, settings.rounds);
        let mut round = Round::default();
        // The baseline: the same load over one address × 4 connections.
        let fds0 = measure::fds(&plain)?;
        let pool = measure::build_pool(&rt, &plain_addrs[..1], 4)?;
        let start_up = measure::start_up(&pool, 4, settings.ready_timeout, &plain)?;
        if start_up.ready.is_some() {
            let calls = measure::calls(
                &rt,
                &pool,
                settings.concurrency,
                settings.warmup,
                settings.window,
                &mut plain,
            )?;
            eprintln!("[{tag}] baseline 1×4: {}", fmt_calls(&calls));
            round.baseline = Some(calls);
        }
        let close = measure::close(&rt, pool, fds0, &plain)?;
        if close.outcome.is_err() {
            eprintln!("[{tag}] baseline close: {:?}", close.outcome);
        }
        for &size in &settings.sizes {
            let run = run_size(
                &rt,
                &settings,
                size,
                &plain_addrs,
                &mut plain,
                settings.warmup,
                settings.window,
            )?;
            eprintln!("[{tag}] {size:>6}: {}", fmt_size(&run));
            round.sizes.push(run);
        }
        if settings.churn_size > 0 {
            // The warm-up lasts until the youngest age: recycling has begun.
            let run = run_size(
                &rt,
                &settings,
                settings.churn_size,
                &churn_addrs,
                &mut churny,
                churn_ages[0],
                settings.churn_window,
            )?;
            eprintln!("[{tag}] churn {}: {}", settings.churn_size, fmt_size(&run));
            round.churn = Some(run);
        }
        rounds.push(round);
    }
    let date_after = date();
    let load_after = loadavg();
    print_machine(&date_before, &date_after, &load_before, &load_after);
    print_settings(&settings, &churn_ages);
    Ok(print_report(&settings, &rounds))
}

/// Start-up, calls (if all Ready) and close of one pool of `size` over `addrs`.
fn run_size(
    rt: &tokio::runtime::Runtime,
    settings: &Settings,
    size: usize,
    addrs: &[SocketAddr],
    servers: &mut [ServerProc],
    warmup: Duration,
    window: Duration,
) -> Result<SizeRun, BoxError> {
    let fds0 = measure::fds(servers)?;
    let pool = measure::build_pool(rt, addrs, settings.per_address(size))?;
    let start_up = measure::start_up(&pool, size, settings.ready_timeout, servers)?;
    let calls = match start_up.ready {
        Some(_) => Some(measure::calls(
            rt,
            &pool,
            settings.concurrency,
            warmup,
            window,
            servers,
        )?),
        None => None,
    };
    let connections_after = measure::connections(&pool.snapshot());
    let close = measure::close(rt, pool, fds0, servers)?;
    Ok(SizeRun {
        start_up,
        calls,
        connections_after,
        close,
    })
}

/// Starts the servers of one set (`block` 1: plain, 2: churn) on 127.`block`.x.y, spread
/// over `SCALE_SERVER_PROCS` processes.
fn spawn_servers(
    settings: &Settings,
    block: u8,
    ages: Option<&[Duration]>,
) -> Result<Vec<ServerProc>, BoxError> {
    let ips: Vec<Ipv4Addr> = (0..settings.servers)
        .map(|i| {
            let third = u8::try_from(i / PER_BLOCK).expect("SCALE_SERVERS is bounded");
            let fourth = u8::try_from(1 + i % PER_BLOCK).expect("at most 250");
            Ipv4Addr::new(127, block, third, fourth)
        })
        .collect();
    let per_proc = settings.servers.div_ceil(settings.server_procs);
    ips.chunks(per_proc)
        .enumerate()
        .map(|(p, chunk)| {
            let ages = ages.map(|a| &a[p * per_proc..p * per_proc + chunk.len()]);
            ServerProc::spawn_many(chunk, ages)
        })
        .collect()
}

/// The churn servers' connection ages: address i of n recycles its connections at
/// A × (1 + i / n), with A = size / `SCALE_CHURN_RATE`. The connections all open at start-up,
/// so between A and 2A every address recycles its connections once, one address every A / n
/// seconds: `SCALE_CHURN_RATE` connections per second, evenly — no waves. (A replaced
/// connection's own age ends after 2A, so a window within [A, 2A] sees first recycles only.)
fn churn_ages(settings: &Settings) -> Vec<Duration> {
    if settings.churn_size == 0 {
        return Vec::new();
    }
    let n = settings.servers;
    let a = settings.churn_size as f64 / settings.churn_rate;
    (0..n)
        .map(|i| Duration::from_secs_f64(a * (1.0 + i as f64 / n as f64)))
        .collect()
}

// === report ===

fn fmt_calls(c: &Calls) -> String {
    format!(
        "{:.0} req/s, client {:.1} µs/call, {:.2} writes/call, failed {}, accepted {}, \
         GOAWAYs {}, retried {}, other {:.2} cores",
        c.rps,
        c.client_cpu_us,
        c.writes_per_call,
        c.failed_total(),
        c.accepted,
        c.goaways,
        c.retried,
        c.other_cores
    )
}

fn fmt_size(run: &SizeRun) -> String {
    let s = &run.start_up;
    let ready = match s.ready {
        Some(t) => format!("Ready in {:.3} s", t.as_secs_f64()),
        None => format!("NOT all Ready ({} Ready) at the timeout", s.ready_count),
    };
    format!(
        "{ready}, client {:.0} µs CPU (waiter {:.0} µs: {} events, {} lagged, {} snapshots), \
         other {:.2} cores; {}; close {:.3} s {:?}, fds left {}/{}",
        s.client_cpu.as_secs_f64() * 1e6,
        s.waiter_cpu.as_secs_f64() * 1e6,
        s.events,
        s.lagged,
        s.snapshots,
        s.other_cores,
        run.calls.as_ref().map_or("no calls".to_owned(), fmt_calls),
        run.close.time.as_secs_f64(),
        run.close.outcome,
        run.close.client_fds_left,
        run.close.server_fds_left,
    )
}

/// `median (min–max)` with `digits` decimals; "—" for no values.
fn mmm(values: &[f64], digits: usize) -> String {
    if values.is_empty() {
        return "—".to_owned();
    }
    let (m, lo, hi) = stats(values.iter().copied());
    if values.len() == 1 {
        format!("{m:.digits$}")
    } else {
        format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
    }
}

fn errors(calls: &[&Calls]) -> String {
    let mut total: std::collections::BTreeMap<&str, u64> = Default::default();
    for c in calls {
        for (code, n) in &c.failed {
            *total.entry(code).or_default() += n;
        }
    }
    if total.values().sum::<u64>() == 0 {
        return "0".to_owned();
    }
    total
        .iter()
        .map(|(code, n)| format!("{code} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Prints the tables and the goals; returns the problems found (timeouts, failed closes,
/// failed calls, leaks).
fn print_report(settings: &Settings, rounds: &[Round]) -> Vec<String> {
    let mut problems = Vec::new();
    println!("\n### Start-up and close()\n");
    println!(
        "| connections | per address | all Ready (s) | client CPU per connection (µs) | \
         server CPU per connection (µs) | close() (s) | close() result | fds left (client/servers) \
         | waiter: events, lagged, snapshots | other processes (cores) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let sizes: Vec<(String, usize, Vec<&SizeRun>)> = settings
        .sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            (
                size.to_string(),
                size,
                rounds.iter().map(|r| &r.sizes[i]).collect(),
            )
        })
        .chain(settings.churn_size.gt(&0).then(|| {
            (
                format!("{} (churn)", settings.churn_size),
                settings.churn_size,
                rounds.iter().filter_map(|r| r.churn.as_ref()).collect(),
            )
        }))
        .collect();
    for (label, size, runs) in &sizes {
        let ready: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.start_up.ready)
            .map(|t| t.as_secs_f64())
            .collect();
        let timeouts: Vec<usize> = runs
            .iter()
            .filter(|r| r.start_up.ready.is_none())
            .map(|r| r.start_up.ready_count)
            .collect();
        let ready_text = if timeouts.is_empty() {
            mmm(&ready, 3)
        } else {
            problems.push(format!(
                "{label}: start-up timed out after {:?} in {} round(s) (Ready then: {timeouts:?})",
                settings.ready_timeout,
                timeouts.len()
            ));
            format!(
                "{} + {} timeout(s) at {} s ({timeouts:?} Ready)",
                mmm(&ready, 3),
                timeouts.len(),
                settings.ready_timeout.as_secs_f64()
            )
        };
        let per = |d: Duration| d.as_secs_f64() * 1e6 / *size as f64;
        let client: Vec<f64> = runs.iter().map(|r| per(r.start_up.client_cpu)).collect();
        let server: Vec<f64> = runs.iter().map(|r| per(r.start_up.server_cpu)).collect();
        let close: Vec<f64> = runs.iter().map(|r| r.close.time.as_secs_f64()).collect();
        let close_errors: Vec<&String> = runs
            .iter()
            .filter_map(|r| r.close.outcome.as_ref().err())
            .collect();
        for e in &close_errors {
            problems.push(format!("{label}: close() failed: {e}"));
        }
        let close_result = if close_errors.is_empty() {
            format!("Ok ×{}", runs.len())
        } else {
            format!("{} Err of {}", close_errors.len(), runs.len())
        };
        let fds: Vec<String> = runs
            .iter()
            .map(|r| format!("{}/{}", r.close.client_fds_left, r.close.server_fds_left))
            .collect();
        if runs
            .iter()
            .any(|r| r.close.client_fds_left != 0 || r.close.server_fds_left != 0)
        {
            problems.push(format!("{label}: fds left after close: {fds:?}"));
        }
        for r in runs {
            if r.start_up.ready.is_some() && r.connections_after != *size {
                problems.push(format!(
                    "{label}: {} connections in the pool after the calls, expected {size}",
                    r.connections_after
                ));
            }
        }
        let waiter: Vec<String> = runs
            .iter()
            .map(|r| {
                format!(
                    "{}/{}/{}",
                    r.start_up.events, r.start_up.lagged, r.start_up.snapshots
                )
            })
            .collect();
        let other: Vec<f64> = runs.iter().map(|r| r.start_up.other_cores).collect();
        println!(
            "| {label} | {} | {ready_text} | {} | {} | {} | {close_result} | {} | {} | {} |",
            settings.per_address(*size),
            mmm(&client, 0),
            mmm(&server, 0),
            mmm(&close, 3),
            fds.join(" "),
            waiter.join(" "),
            mmm(&other, 2),
        );
    }

    println!(
        "\n### Calls ({} callers, {} s windows; baseline: one address × 4 connections)\n",
        settings.concurrency,
        settings.window.as_secs_f64()
    );
    println!(
        "| connections | req/s | × baseline (per round) | client CPU per call (µs) | \
         server CPU per call (µs) | write syscalls per call | failed calls | other processes (cores) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let baselines: Vec<Option<&Calls>> = rounds.iter().map(|r| r.baseline.as_ref()).collect();
    let mut print_calls = |label: &str, calls: Vec<Option<&Calls>>, base: &[Option<&Calls>]| {
        let present: Vec<&Calls> = calls.iter().flatten().copied().collect();
        if present.is_empty() {
            println!("| {label} | no calls (start-up timed out) | | | | | | |");
            return;
        }
        let ratios: Vec<f64> = calls
            .iter()
            .zip(base)
            .filter_map(|(c, b)| Some(c.as_ref()?.rps / b.as_ref()?.rps))
            .collect();
        let failed: u64 = present.iter().map(|c| c.failed_total()).sum();
        if failed > 0 {
            problems.push(format!(
                "{label}: {failed} failed call(s): {}",
                errors(&present)
            ));
        }
        let f = |g: fn(&Calls) -> f64| present.iter().map(|c| g(c)).collect::<Vec<_>>();
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} |",
            mmm(&f(|c| c.rps), 0),
            mmm(&ratios, 2),
            mmm(&f(|c| c.client_cpu_us), 1),
            mmm(&f(|c| c.server_cpu_us), 1),
            mmm(&f(|c| c.writes_per_call), 2),
            errors(&present),
            mmm(&f(|c| c.other_cores), 2),
        );
    };
    print_calls("1 × 4 (baseline)", baselines.clone(), &baselines);
    for (i, size) in settings.sizes.iter().enumerate() {
        let calls = rounds.iter().map(|r| r.sizes[i].calls.as_ref()).collect();
        print_calls(&size.to_string(), calls, &baselines);
    }

    if settings.churn_size > 0 {
        println!(
            "\n### Churn ({} connections, servers recycle ~{} per second; {} s windows)\n",
            settings.churn_size,
            settings.churn_rate,
            settings.churn_window.as_secs_f64()
        );
        println!(
            "| connections | replaced per second (servers accepted) | GOAWAYs seen by the pool per second \
             | attempts retried by the pool | req/s | × no churn, same size (per round) \
             | client CPU per call (µs) | failed calls | connections after | other processes (cores) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        let no_churn = settings
            .sizes
            .iter()
            .position(|&s| s == settings.churn_size);
        let churn: Vec<Option<&Calls>> = rounds
            .iter()
            .map(|r| r.churn.as_ref().and_then(|c| c.calls.as_ref()))
            .collect();
        let present: Vec<&Calls> = churn.iter().flatten().copied().collect();
        let ratios: Vec<f64> = match no_churn {
            Some(i) => rounds
                .iter()
                .zip(&churn)
                .filter_map(|(r, c)| Some(c.as_ref()?.rps / r.sizes[i].calls.as_ref()?.rps))
                .collect(),
            None => Vec::new(),
        };
        let secs = settings.churn_window.as_secs_f64();
        let f = |g: fn(&Calls) -> f64| present.iter().map(|c| g(c)).collect::<Vec<_>>();
        let replaced: Vec<f64> = present.iter().map(|c| c.accepted as f64 / secs).collect();
        let goaways: Vec<f64> = present.iter().map(|c| c.goaways as f64 / secs).collect();
        let after: Vec<String> = rounds
            .iter()
            .filter_map(|r| r.churn.as_ref())
            .map(|c| c.connections_after.to_string())
            .collect();
        let failed: u64 = present.iter().map(|c| c.failed_total()).sum();
        if failed > 0 {
            problems.push(format!(
                "churn: {failed} failed call(s): {}",
                errors(&present)
            ));
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            settings.churn_size,
            mmm(&replaced, 0),
            mmm(&goaways, 0),
            mmm(&f(|c| c.retried as f64), 0),
            mmm(&f(|c| c.rps), 0),
            mmm(&ratios, 2),
            mmm(&f(|c| c.client_cpu_us), 1),
            errors(&present),
            after.join(" "),
            mmm(&f(|c| c.other_cores), 2),
        );
    }
    print_goals(&sizes, &problems);
    problems
}

/// The goals of issue #15 item 1, each with a verdict, judged on the medians over rounds.
fn print_goals(sizes: &[(String, usize, Vec<&SizeRun>)], problems: &[String]) {
    println!("\n### Goals (issue #15)\n");
    println!("| goal | measured | holds |");
    println!("|---|---|---|");
    let verdict = |holds: bool| if holds { "yes" } else { "no" };
    let median_of = |runs: &[&SizeRun], f: &dyn Fn(&SizeRun) -> Option<f64>| {
        let values: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
        (values.len() == runs.len() && !values.is_empty()).then(|| stats(values).0)
    };
    let plain = sizes.iter().filter(|(label, ..)| !label.contains("churn"));
    let cpu: Vec<(usize, Option<f64>)> = plain
        .clone()
        .map(|(_, size, runs)| {
            let per = |r: &SizeRun| Some(r.start_up.client_cpu.as_secs_f64() * 1e6 / *size as f64);
            (*size, median_of(runs, &per))
        })
        .collect();
    let cpu_text: Vec<String> = cpu
        .iter()
        .map(|(size, us)| match us {
            Some(us) => format!("{size}: {us:.0}"),
            None => format!("{size}: —"),
        })
        .collect();
    let cpu_ok = cpu.iter().all(|(_, us)| us.is_some_and(|us| us <= 100.0));
    println!(
        "| client CPU per connection ≤ 100 µs at every size (µs) | {} | {} |",
        cpu_text.join(", "),
        verdict(cpu_ok)
    );
    let largest = plain.clone().find(|(_, size, _)| *size == 16_000);
    match largest {
        Some((_, _, runs)) => {
            let ready = median_of(runs, &|r| r.start_up.ready.map(|t| t.as_secs_f64()));
            let close = median_of(runs, &|r| Some(r.close.time.as_secs_f64()));
            let close_errors = runs.iter().filter(|r| r.close.outcome.is_err()).count();
            let show = |v: Option<f64>| v.map_or("timed out".to_owned(), |v| format!("{v:.2} s"));
            println!(
                "| 16 000 connections all Ready ≤ 3 s | {} | {} |",
                show(ready),
                verdict(ready.is_some_and(|t| t <= 3.0))
            );
            println!(
                "| close() of 16 000 ≤ 1 s, Ok | {}, {close_errors} Err of {} | {} |",
                show(close),
                runs.len(),
                verdict(close_errors == 0 && close.is_some_and(|t| t <= 1.0))
            );
        }
        None => println!("| 16 000 connections: Ready ≤ 3 s, close() ≤ 1 s | not measured (add 16000 to SCALE_CONNECTIONS) | — |"),
    }
    println!(
        "| no failed call, no failed close, no timeout, nothing left open | {} problem(s) | {} |",
        problems.len(),
        verdict(problems.is_empty())
    );
}

/// The machine, as `benches/README.md`'s recording rules ask: cores, CPU model, memory,
/// compiler, and how busy it was around the run.
fn print_machine(date_before: &str, date_after: &str, load_before: &str, load_after: &str) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .map(|m| m.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let rustc = command_line("rustc", &["--version"]);
    let commit = command_line("git", &["rev-parse", "--short", "HEAD"]);
    println!("\n### Machine\n");
    println!("- run: {date_before} → {date_after}; commit {commit}");
    println!("- {cores} cores, {model}, {memory}; {rustc}");
    println!("- load average (1, 5, 15 min): {load_before} before, {load_after} after");
}

fn print_settings(settings: &Settings, churn_ages: &[Duration]) {
    println!(
        "- {} servers in {} processes; {} round(s); {} callers; calls {} s after {} s warm-up",
        settings.servers,
        settings.server_procs,
        settings.rounds,
        settings.concurrency,
        settings.window.as_secs_f64(),
        settings.warmup.as_secs_f64()
    );
    if let (Some(first), Some(last)) = (churn_ages.first(), churn_ages.last()) {
        println!(
            "- churn: {} connections, connection ages {:.2}–{:.2} s across addresses (~{} replaced/s), \
             warm-up {:.2} s, window {} s",
            settings.churn_size,
            first.as_secs_f64(),
            last.as_secs_f64(),
            settings.churn_rate,
            first.as_secs_f64(),
            settings.churn_window.as_secs_f64()
        );
    }
}

/// The first line a command prints, or "unknown".
fn command_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn date() -> String {
    command_line("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"])
}

/// The machine's load averages (`/proc/loadavg`: 1, 5 and 15 minutes).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// This process's open-file limit (`Max open files` of `/proc/self/limits`, the soft one),
/// which the server processes inherit.
fn fd_limit() -> Result<usize, BoxError> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .ok_or("no `Max open files` in /proc/self/limits")?;
    let soft = line
        .split_whitespace()
        .next()
        .ok_or("bad /proc/self/limits")?;
    Ok(soft.parse().unwrap_or(usize::MAX)) // "unlimited"
}
