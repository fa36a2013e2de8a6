//! One connection count's measurements: start-up to all Ready (counted from the pool's events
//! on a thread of its own, whose CPU is subtracted), the calls phase, the churn phase and
//! `close()`; and the `/proc` readers they need beyond the load bench's.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tonic_pool::{ConnectivityState, Pool, PoolSnapshot, Scope, StateEvents};

use crate::common::echo::echo_client::EchoClient;
use crate::common::request;
use crate::server::{machine_busy, open_fds, process_cpu, ServerProc};
use crate::BoxError;

/// Bound on `close()` (the pool's own `close_timeout` only bounds calls in flight, and none
/// are when the bench closes).
const CLOSE_BOUND: Duration = Duration::from_secs(60);
/// Bound on waiting for sockets to be gone after a close (fds back to where they were).
const SETTLE_BOUND: Duration = Duration::from_secs(5);

/// Start-up: from `Pool::connect` to every connection Ready.
#[derive(Debug, Clone)]
pub(crate) struct StartUp {
    /// Time to all Ready; `None` when `ready_timeout` passed first.
    pub(crate) ready: Option<Duration>,
    /// Ready connections when it ended (all of them, unless it timed out).
    pub(crate) ready_count: usize,
    /// The client's CPU over the start-up, the waiter thread's own CPU taken out.
    pub(crate) client_cpu: Duration,
    /// The waiter thread's CPU (events received, the snapshots it took): subtracted above.
    pub(crate) waiter_cpu: Duration,
    /// The server processes' CPU over the start-up.
    pub(crate) server_cpu: Duration,
    /// Events the waiter received, events it lost to `Lagged`, snapshots it took.
    pub(crate) events: u64,
    pub(crate) lagged: u64,
    pub(crate) snapshots: u64,
    /// Other processes' CPU during the start-up, in cores.
    pub(crate) other_cores: f64,
}

/// A closed-loop calls window.
#[derive(Debug, Clone, Default)]
pub(crate) struct Calls {
    pub(crate) rps: f64,
    /// Calls completed in the window (successes and failures).
    pub(crate) calls: u64,
    pub(crate) client_cpu_us: f64,
    pub(crate) server_cpu_us: f64,
    /// Write-family system calls (write, writev, …: `syscw` of `/proc/self/io`) per call.
    pub(crate) writes_per_call: f64,
    /// Failed calls by status code, over the warm-up and the window.
    pub(crate) failed: BTreeMap<String, u64>,
    /// Connections the servers accepted during the window (churn: replacements).
    pub(crate) accepted: u64,
    /// Connections the pool saw end with a GOAWAY during the window.
    pub(crate) goaways: u64,
    /// Attempts the pool sent again on another connection (transparent retries, which the
    /// caller never sees) during the window.
    pub(crate) retried: u64,
    pub(crate) other_cores: f64,
}

impl Calls {
    pub(crate) fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// How `close()` went.
#[derive(Debug, Clone)]
pub(crate) struct Close {
    pub(crate) time: Duration,
    /// `Ok`, or the error (or that it did not return within [`CLOSE_BOUND`]).
    pub(crate) outcome: Result<(), String>,
    /// The client's open file descriptors after the close minus before the pool was built,
    /// once they settled (bounded by [`SETTLE_BOUND`]): sockets the pool left open.
    pub(crate) client_fds_left: i64,
    /// The same for the server processes (their connections' sockets still open).
    pub(crate) server_fds_left: i64,
}

/// A pool's target over `addrs` with `per_address` connections each, Idle until
/// [`start_up`] calls `connect` (so that no event is missed and build time is not counted).
pub(crate) fn build_pool(
    rt: &tokio::runtime::Runtime,
    addrs: &[SocketAddr],
    per_address: usize,
) -> Result<Pool, BoxError> {
    let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let _entered = rt.enter();
    Ok(Pool::builder(format!("static:///{}", list.join(",")))
        .connections_per_endpoint(per_address)
        .connect_lazily(true)
        .build()?)
}

/// Open fds of this process and of the servers, before a pool is built.
pub(crate) fn fds(servers: &[ServerProc]) -> Result<(usize, usize), BoxError> {
    let mut server = 0;
    for s in servers {
        server += s.open_fds()?;
    }
    Ok((open_fds("/proc/self/fd")?, server))
}

/// Connects the (lazy) `pool` and waits until `total` connections are Ready, for at most
/// `timeout`.
///
/// The waiting runs on a thread of its own (a current-thread runtime) that counts Ready
/// connections from `pool.events()` — O(1) per event, unlike `wait_until`, which takes a
/// snapshot per change. If the events lag (the pool's buffer holds 4 096), it recounts from
/// one snapshot; when its count reaches `total` it confirms with one snapshot. That thread's
/// CPU (`/proc/thread-self/schedstat`) is subtracted from the process's, so the client CPU is
/// the pool's (and the runtime's) alone.
pub(crate) fn start_up(
    pool: &Pool,
    total: usize,
    timeout: Duration,
    servers: &[ServerProc],
) -> Result<StartUp, BoxError> {
    let events = pool.events();
    let (go_tx, go_rx) = mpsc::channel::<Instant>();
    let (armed_tx, armed_rx) = mpsc::channel::<()>();
    let waiter_pool = pool.clone();
    let waiter = std::thread::Builder::new()
        .name("scale-waiter".into())
        .spawn(move || -> Result<(Waited, Duration), BoxError> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()?;
            let cpu0 = thread_cpu()?;
            armed_tx.send(())?;
            let started = go_rx.recv()?;
            let waited =
                rt.block_on(count_ready(&waiter_pool, events, total, started + timeout))?;
            Ok((waited, thread_cpu()?.saturating_sub(cpu0)))
        })?;
    armed_rx
        .recv()
        .map_err(|_| "waiter thread failed to start")?;
    let machine0 = machine_busy()?;
    let server0 = servers_cpu_ns(servers)?;
    let cpu0 = tasks_cpu("self")?;
    let started = Instant::now();
    pool.connect();
    go_tx.send(started)?;
    let (waited, waiter_cpu) = waiter.join().map_err(|_| "waiter thread panicked")??;
    let cpu1 = tasks_cpu("self")?;
    let server1 = servers_cpu_ns(servers)?;
    let machine1 = machine_busy()?;
    let elapsed = started.elapsed();
    let client_cpu = cpu1.saturating_sub(cpu0).saturating_sub(waiter_cpu);
    let server_cpu = server1.saturating_sub(server0);
    let other_cores = machine1
        .saturating_sub(machine0)
        .saturating_sub(cpu1.saturating_sub(cpu0) + server_cpu)
        .as_secs_f64()
        / elapsed.as_secs_f64();
    Ok(StartUp {
        ready: waited.at.map(|at| at.duration_since(started)),
        ready_count: waited.ready,
        client_cpu,
        waiter_cpu,
        server_cpu,
        events: waited.events,
        lagged: waited.lagged,
        snapshots: waited.snapshots,
        other_cores,
    })
}

/// What the waiter thread saw.
#[derive(Debug)]
struct Waited {
    /// When the count reached the total (confirmed by a snapshot); `None` on timeout.
    at: Option<Instant>,
    ready: usize,
    events: u64,
    lagged: u64,
    snapshots: u64,
}

/// Counts Ready connections from the events (connection id → Ready or not) until `total`.
async fn count_ready(
    pool: &Pool,
    mut events: StateEvents,
    total: usize,
    deadline: Instant,
) -> Result<Waited, BoxError> {
    let mut ready: HashMap<u64, bool> = HashMap::with_capacity(total * 2);
    let mut count = 0usize;
    let mut waited = Waited {
        at: None,
        ready: 0,
        events: 0,
        lagged: 0,
        snapshots: 0,
    };
    // From one snapshot: what it says is the truth up to now; events still buffered are older
    // or newer, and applying them in order ends with each connection's latest state.
    let recount = |ready: &mut HashMap<u64, bool>, snapshot: &PoolSnapshot| {
        ready.clear();
        for endpoint in &snapshot.endpoints {
            for conn in &endpoint.connections {
                ready.insert(conn.id, conn.state == ConnectivityState::Ready);
            }
        }
        ready.values().filter(|r| **r).count()
    };
    loop {
        match tokio::time::timeout_at(deadline.into(), events.recv()).await {
            Err(_) => {
                waited.ready = pool.snapshot().ready_connections();
                return Ok(waited);
            }
            Ok(Err(RecvError::Closed)) => return Err("the pool's events ended".into()),
            Ok(Err(RecvError::Lagged(n))) => {
                waited.lagged += n;
                waited.snapshots += 1;
                count = recount(&mut ready, &pool.snapshot());
            }
            Ok(Ok(event)) => {
                waited.events += 1;
                if let Scope::Connection { id, .. } = event.scope {
                    let now = event.to == ConnectivityState::Ready;
                    let was = ready.insert(id, now).unwrap_or(false);
                    count = count + usize::from(now) - usize::from(was);
                }
            }
        }
        if count >= total {
            let at = Instant::now();
            let snapshot = pool.snapshot();
            waited.snapshots += 1;
            if snapshot.ready_connections() >= total {
                waited.at = Some(at);
                waited.ready = snapshot.ready_connections();
                return Ok(waited);
            }
            count = recount(&mut ready, &snapshot);
        }
    }
}

/// Runs `concurrency` callers back to back over `pool` for `warmup` and then the measured
/// `window`; reads CPU, write system calls, the servers' accepted connections and the pool's
/// GOAWAY count at the window's edges.
pub(crate) fn calls(
    rt: &tokio::runtime::Runtime,
    pool: &Pool,
    concurrency: usize,
    warmup: Duration,
    window: Duration,
    servers: &mut [ServerProc],
) -> Result<Calls, BoxError> {
    rt.block_on(async {
        let begin = Instant::now();
        let window_start = begin + warmup;
        let window_end = window_start + window;
        let mut tasks = tokio::task::JoinSet::new();
        let client = EchoClient::new(pool.clone());
        for _ in 0..concurrency {
            let mut client = client.clone();
            tasks.spawn(async move {
                let mut ok = 0u64;
                let mut failed: BTreeMap<String, u64> = BTreeMap::new();
                let mut in_window = 0u64;
                // Bounded by the clock: no call starts after the window ends.
                loop {
                    let started = Instant::now();
                    if started >= window_end {
                        break;
                    }
                    let outcome = client.unary(request(0)).await;
                    let counted = started >= window_start;
                    in_window += u64::from(counted);
                    match outcome {
                        Ok(_) => ok += u64::from(counted),
                        // Every failure counts, warm-up included.
                        Err(status) => {
                            *failed.entry(format!("{:?}", status.code())).or_default() += 1
                        }
                    }
                }
                (ok, in_window, failed)
            });
        }
        drop(client);
        // This future runs on the thread that called `block_on`, not on a runtime worker,
        // so the short blocking reads below do not stall the callers.
        tokio::time::sleep_until(window_start.into()).await;
        let (goaways0, retried0) = pool_counts(&pool.snapshot());
        let accepted0 = servers_accepted(servers)?;
        let machine0 = machine_busy()?;
        let server0 = servers_cpu(servers)?;
        let cpu0 = process_cpu("/proc/self/stat")?;
        let writes0 = write_syscalls()?;
        tokio::time::sleep_until(window_end.into()).await;
        let writes1 = write_syscalls()?;
        let cpu1 = process_cpu("/proc/self/stat")?;
        let server1 = servers_cpu(servers)?;
        let machine1 = machine_busy()?;
        let accepted1 = servers_accepted(servers)?;
        let (goaways1, retried1) = pool_counts(&pool.snapshot());
        let mut result = Calls::default();
        let mut ok = 0;
        while let Some(done) = tasks.join_next().await {
            let (task_ok, in_window, failed) = done?;
            ok += task_ok;
            result.calls += in_window;
            for (code, n) in failed {
                *result.failed.entry(code).or_default() += n;
            }
        }
        let client_cpu = cpu1.saturating_sub(cpu0);
        let server_cpu = server1.saturating_sub(server0);
        let per_call = |d: Duration| d.as_secs_f64() * 1e6 / result.calls.max(1) as f64;
        result.rps = ok as f64 / window.as_secs_f64();
        result.client_cpu_us = per_call(client_cpu);
        result.server_cpu_us = per_call(server_cpu);
        result.writes_per_call =
            writes1.saturating_sub(writes0) as f64 / result.calls.max(1) as f64;
        result.accepted = accepted1.saturating_sub(accepted0);
        result.goaways = goaways1.saturating_sub(goaways0);
        result.retried = retried1.saturating_sub(retried0);
        result.other_cores = machine1
            .saturating_sub(machine0)
            .saturating_sub(client_cpu + server_cpu)
            .as_secs_f64()
            / window.as_secs_f64();
        Ok(result)
    })
}

/// Closes `pool` (bounded by [`CLOSE_BOUND`]) and drops it, then waits (bounded) for the
/// client's and the servers' fds to come back to `fds_before`.
pub(crate) fn close(
    rt: &tokio::runtime::Runtime,
    pool: Pool,
    fds_before: (usize, usize),
    servers: &[ServerProc],
) -> Result<Close, BoxError> {
    let started = Instant::now();
    let outcome = rt.block_on(async { tokio::time::timeout(CLOSE_BOUND, pool.close()).await });
    let time = started.elapsed();
    let outcome = match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("close() did not return within {CLOSE_BOUND:?}")),
    };
    drop(pool);
    let deadline = Instant::now() + SETTLE_BOUND;
    let mut now = fds(servers)?;
    while now != fds_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        now = fds(servers)?;
    }
    Ok(Close {
        time,
        outcome,
        client_fds_left: now.0 as i64 - fds_before.0 as i64,
        server_fds_left: now.1 as i64 - fds_before.1 as i64,
    })
}

/// Connections of every endpoint in a snapshot.
pub(crate) fn connections(snapshot: &PoolSnapshot) -> usize {
    snapshot.endpoints.iter().map(|e| e.connections.len()).sum()
}

/// Connections ended by GOAWAY and transparently retried attempts, over the pool's life.
fn pool_counts(snapshot: &PoolSnapshot) -> (u64, u64) {
    let counters = &snapshot.counters;
    (counters.disconnections.goaway, counters.calls.retried)
}

fn servers_cpu(servers: &[ServerProc]) -> Result<Duration, BoxError> {
    let mut cpu = Duration::ZERO;
    for server in servers {
        cpu += server.cpu()?;
    }
    Ok(cpu)
}

fn servers_accepted(servers: &mut [ServerProc]) -> Result<u64, BoxError> {
    let mut accepted = 0;
    for server in servers {
        accepted += server.accepted()?;
    }
    Ok(accepted)
}

/// The servers' CPU to the nanosecond (see [`tasks_cpu`]).
fn servers_cpu_ns(servers: &[ServerProc]) -> Result<Duration, BoxError> {
    let mut cpu = Duration::ZERO;
    for server in servers {
        cpu += tasks_cpu(&server.pid().to_string())?;
    }
    Ok(cpu)
}

/// A process's CPU to the nanosecond (`pid` a number or `self`): the sum over its threads of
/// `/proc/<pid>/task/*/schedstat`'s time on CPU. A start-up at 250 connections lasts tens
/// of ms, which the 10 ms ticks of `/proc/<pid>/stat` cannot resolve. It misses threads
/// that ended within the window; the runtimes' threads live for the whole run.
fn tasks_cpu(pid: &str) -> Result<Duration, BoxError> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        if let Ok(stat) = std::fs::read_to_string(path) {
            ns += schedstat_ns(&stat)?;
        }
    }
    Ok(Duration::from_nanos(ns))
}

/// The calling thread's CPU to the nanosecond (`/proc/thread-self/schedstat`).
fn thread_cpu() -> Result<Duration, BoxError> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    Ok(Duration::from_nanos(schedstat_ns(&stat)?))
}

/// The first field of a `schedstat`: ns spent on a CPU.
fn schedstat_ns(stat: &str) -> Result<u64, BoxError> {
    Ok(stat
        .split_whitespace()
        .next()
        .ok_or("empty schedstat")?
        .parse()?)
}

/// `syscw` of `/proc/self/io`: write-family system calls (write, writev, …). Socket reads go
/// through recv(2), which it does not count, so there is no matching read figure.
fn write_syscalls() -> Result<u64, BoxError> {
    let io = std::fs::read_to_string("/proc/self/io")?;
    let line = io
        .lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .ok_or("no syscw in /proc/self/io")?;
    Ok(line.trim().parse()?)
}
