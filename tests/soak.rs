//! Soak and leaks: a pool under connection churn (servers recycling every connection after
//! 200 ms, addresses coming and going, calls cancelled mid-way) for `SOAK_SECS` seconds, then
//! back to where it started: no tokio task, socket or file descriptor left behind, and resident
//! memory flat.
//!
//! The soak is `#[ignore]`d (it runs for a while); run it with
//!
//! ```text
//! SOAK_SECS=20 cargo test --test soak -- --ignored --nocapture
//! ```
//!
//! It is the only test of this binary, on purpose: file descriptors are counted for the whole
//! process, so no other test may open or close any meanwhile. Every server runs in this process
//! (on threads and runtimes of its own), so the descriptors counted in `/proc/self/fd` are the
//! client's and the servers' together; the pool and the test's own tasks run on the test's
//! runtime, whose alive tasks are counted.

#[allow(dead_code, unused_imports)] // this binary uses a part of the tests' support
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use support::common::{builder, client, slow_echo, wait_all_ready, WAIT};
use support::echo::StreamRequest;
use support::{loopback, ServerOptions, TestServer};
use tokio::time::Instant;
use tonic::Code;
use tonic_pool::resolve::{BoxFuture, Resolution, Resolve, ResolveError};
use tonic_pool::{ConnectivityState, Pool, PoolSnapshot, Target};

/// How long the soak runs unless `SOAK_SECS` says otherwise.
const DEFAULT_SOAK_SECS: u64 = 20;
/// Servers send GOAWAY to each connection once it is this old, so every connection is
/// replaced several times a second.
const MAX_CONNECTION_AGE: Duration = Duration::from_millis(200);
/// Servers the resolver picks its address subsets from (127.0.0.2 up).
const SERVERS: usize = 6;
/// At most this many addresses are resolved at once.
const MAX_RESOLVED: usize = 3;
/// Connections the pool keeps to every resolved address.
const CONNECTIONS_PER_ENDPOINT: usize = 2;
/// Closed-loop callers whose calls are never cancelled: every one of their calls must succeed.
const PLAIN_WORKERS: usize = 12;
/// Callers whose calls carry a deadline shorter than some of the server's replies take.
const DEADLINE_WORKERS: usize = 2;
/// Callers that drop their call's future before it completes, for some of them.
const DROPPING_WORKERS: usize = 2;
/// Callers that open server streams and drop them after the first few messages.
const STREAM_WORKERS: usize = 1;
/// After each change of the address set, every resolved server must serve this many more
/// calls before the next change, so that every address carries traffic.
const CALLS_PER_ADDRESS_SET: u64 = 50;
/// A caller makes at most this many calls (a bound the run never reaches in practice).
const MAX_CALLS_PER_WORKER: u64 = 100_000_000;
/// How often the soak prints a progress line.
const REPORT_EVERY: Duration = Duration::from_secs(30);
/// How much resident memory may grow from the end of the warm-up to the end of the soak.
///
/// RSS is not a precise leak meter: the allocator keeps freed memory in its per-thread arenas
/// and returns it to the kernel when it pleases, and the peak number of calls, streams and
/// connections alive at once (which sets how much it holds) varies with scheduling. Runs of
/// this test settle within a few MiB of the warm level; 16 MiB is far above that noise and
/// far below what a leak per call (over a million calls in a long run) or per reconnection
/// (tens of thousands) would add.
const RSS_SLACK_KIB: u64 = 16 * 1024;

/// `SOAK_SECS` from the environment, else [`DEFAULT_SOAK_SECS`].
fn soak_duration() -> Duration {
    let secs = std::env::var("SOAK_SECS")
        .ok()
        .map(|v| {
            v.parse::<u64>()
                .expect("SOAK_SECS is a whole number of seconds")
        })
        .unwrap_or(DEFAULT_SOAK_SECS);
    Duration::from_secs(secs.max(4))
}

/// A field of `/proc/self/status`, in KiB.
fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line.split_whitespace()
        .nth(1)
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("unreadable {line:?}"))
}

/// Resident memory of the process, in KiB.
fn rss_kib() -> u64 {
    proc_status_kib("VmRSS:")
}

/// File descriptors open in the process (sockets of the pool and of the servers included).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// Tasks alive on the current runtime.
fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits until `settled()` holds, at most [`WAIT`]; returns whether it did.
///
/// Only for the two quantities nothing signals: a tokio task ending and the kernel closing a
/// file descriptor. It looks every millisecond; the bound is what makes a leak fail the test.
async fn poll_until(mut settled: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    loop {
        if settled() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A resolver whose answer the test changes: the addresses currently "published".
#[derive(Clone, Debug)]
struct Published {
    addresses: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Published {
    fn new(addresses: Vec<SocketAddr>) -> Self {
        Self {
            addresses: Arc::new(Mutex::new(addresses)),
        }
    }

    fn set(&self, addresses: Vec<SocketAddr>) {
        *self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = addresses;
    }
}

impl Resolve for Published {
    fn resolve(&self, _target: &Target) -> BoxFuture<'static, Result<Resolution, ResolveError>> {
        let addresses = self
            .addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // No TTL: the pool uses its TTL ceiling, set short in the soak.
        Box::pin(async move { Ok(Resolution::new(addresses, None)) })
    }
}

/// The address sets the soak goes through: a fixed pseudo-random sequence of 1 to
/// [`MAX_RESOLVED`] of the servers, each keeping at least one address of the set before it (a
/// rolling change: calls always have somewhere to go).
#[derive(Debug)]
struct AddressSets {
    state: u64,
    current: Vec<usize>,
}

impl AddressSets {
    fn new() -> Self {
        Self {
            state: 0x2545_f491_4f6c_dd1d,
            current: vec![0],
        }
    }

    /// xorshift64: deterministic, no dependency.
    fn next_u64(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// The next set of server indexes.
    fn next_set(&mut self) -> Vec<usize> {
        let kept_index = self.below(self.current.len());
        let kept = self.current[kept_index];
        let size = 1 + self.below(MAX_RESOLVED);
        let mut set = vec![kept];
        // Bounded: at most SERVERS * 4 draws to fill at most MAX_RESOLVED places.
        for _ in 0..SERVERS * 4 {
            if set.len() == size {
                break;
            }
            let candidate = self.below(SERVERS);
            if !set.contains(&candidate) {
                set.push(candidate);
            }
        }
        set.sort_unstable();
        self.current = set.clone();
        set
    }
}

/// Whether the pool's active (not draining) endpoints are exactly `expected` and each of them
/// has a Ready connection.
fn serving_exactly(s: &PoolSnapshot, expected: &[SocketAddr]) -> bool {
    let active: Vec<_> = s.endpoints.iter().filter(|e| !e.draining).collect();
    active.len() == expected.len()
        && active.iter().all(|e| {
            e.addr.socket_addr().is_some_and(|a| expected.contains(&a))
                && e.state == ConnectivityState::Ready
        })
}

/// The kinds of calls the soak makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// No deadline, never dropped.
    Plain,
    /// A deadline of a few milliseconds.
    Deadline,
    /// Dropped after a few milliseconds if not complete.
    Dropped,
    /// A server stream dropped after its first messages.
    Stream,
}

/// What the callers saw, shared by them all.
#[derive(Debug, Default)]
struct Tally {
    /// Calls started.
    calls: AtomicU64,
    /// Calls that completed with a reply (streams: that got their first messages).
    ok: AtomicU64,
    /// Calls whose future was dropped before it completed.
    dropped: AtomicU64,
    /// Failed calls by kind and status code (as an `i32`: `Code` is not `Ord`), with the
    /// first one's message.
    failed: Mutex<BTreeMap<(Kind, i32), (u64, String)>>,
}

impl Tally {
    fn fail(&self, kind: Kind, status: &tonic::Status) {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((kind, status.code() as i32))
            .or_insert_with(|| (0, status.message().to_owned()))
            .0 += 1;
    }

    /// Failed calls: kind, status code, count.
    fn failures(&self) -> Vec<(Kind, Code, u64)> {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(&(kind, code), &(n, _))| (kind, Code::from(code), n))
            .collect()
    }

    /// The first message of every kind of failure.
    fn first_messages(&self) -> Vec<String> {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(&(kind, code), (_, message))| {
                format!("{kind:?} {:?}: {message}", Code::from(code))
            })
            .collect()
    }

    fn failed_total(&self) -> u64 {
        self.failures().iter().map(|(_, _, n)| n).sum()
    }
}

/// Sets its flag when dropped, so that a failed assertion also stops the callers (the runtime
/// could not shut down under callers that never stop).
#[derive(Debug)]
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Callers of one kind, running until `stop` is set.
fn spawn_callers(
    pool: &Pool,
    kind: Kind,
    workers: usize,
    tally: &Arc<Tally>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|w| {
            let mut grpc = client(pool);
            let tally = tally.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                for i in 0..MAX_CALLS_PER_WORKER {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    tally.calls.fetch_add(1, Ordering::Relaxed);
                    // Cycles through short and longer replies so that some calls outlive their
                    // deadline (or their caller's patience) and others do not.
                    let sleep_ms = (i % 7) as u32 * 2;
                    let message = format!("{w}-{i}");
                    let outcome = match kind {
                        Kind::Plain => Some(grpc.unary(slow_echo(&message, 0)).await.map(drop)),
                        Kind::Deadline => {
                            let mut request = tonic::Request::new(slow_echo(&message, sleep_ms));
                            request.set_timeout(Duration::from_millis(5));
                            Some(grpc.unary(request).await.map(drop))
                        }
                        Kind::Dropped => {
                            let call = grpc.unary(slow_echo(&message, sleep_ms));
                            tokio::time::timeout(Duration::from_millis(5), call)
                                .await
                                .ok()
                                .map(|result| result.map(drop))
                        }
                        Kind::Stream => {
                            let call = async {
                                let request = StreamRequest {
                                    count: 10,
                                    interval_ms: 2,
                                    message,
                                };
                                let mut stream = grpc.server_stream(request).await?.into_inner();
                                // Two of ten messages, then the stream is dropped mid-way.
                                for _ in 0..2 {
                                    stream.message().await?;
                                }
                                Ok::<(), tonic::Status>(())
                            };
                            Some(call.await)
                        }
                    };
                    match outcome {
                        Some(Ok(())) => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(Err(status)) => {
                            tally.fail(kind, &status);
                            // A call that fails fast may never have waited: give the runtime
                            // a turn, so that a failing pool cannot pin a worker thread.
                            tokio::task::yield_now().await;
                        }
                        None => {
                            tally.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect()
}

/// The soak's moving parts and what it has seen so far.
struct Soak<'a> {
    pool: &'a Pool,
    resolver: &'a Published,
    servers: &'a [TestServer],
    tally: &'a Tally,
    sets: AddressSets,
    started: Instant,
    /// Connections the servers had accepted when the soak started.
    initial_accepted: u64,
    /// Address sets gone through.
    changes: u64,
    next_report: Instant,
    /// (seconds since the start, RSS in KiB) at every progress line.
    rss_samples: Vec<(u64, u64)>,
}

impl Soak<'_> {
    /// Connections the servers accepted since the soak started.
    fn reconnections(&self) -> u64 {
        let accepted: u64 = self
            .servers
            .iter()
            .map(TestServer::accepted_connections)
            .sum();
        accepted - self.initial_accepted
    }

    /// Prints one line with everything the soak watches, and keeps the RSS for the summary.
    fn report(&mut self, what: &str) {
        let open: u64 = self.servers.iter().map(TestServer::open_connections).sum();
        let (secs, rss) = (self.started.elapsed().as_secs(), rss_kib());
        self.rss_samples.push((secs, rss));
        println!(
            "soak: {secs:>4} s, {} calls, {} ok, {} dropped, failed {:?}, {} address sets, \
             {} reconnections, {open} server connections open, RSS {rss} KiB, {} fds, \
             {} tasks alive{what}",
            self.tally.calls.load(Ordering::Relaxed),
            self.tally.ok.load(Ordering::Relaxed),
            self.tally.dropped.load(Ordering::Relaxed),
            self.tally.failures(),
            self.changes,
            self.reconnections(),
            open_fds(),
            alive_tasks(),
        );
    }

    /// Changes the address set over and over until `until`: publish the next set, wait for
    /// the pool to serve exactly it, wait for every one of its servers to serve more calls.
    /// Prints a progress line every [`REPORT_EVERY`].
    async fn churn_until(&mut self, until: Instant) {
        while Instant::now() < until {
            let set = self.sets.next_set();
            let addrs: Vec<SocketAddr> = set.iter().map(|&i| self.servers[i].addr()).collect();
            self.resolver.set(addrs.clone());
            let settled = self
                .pool
                .wait_until(WAIT, |s| serving_exactly(s, &addrs))
                .await;
            assert!(
                settled,
                "the pool never served exactly {addrs:?}: {:#?}",
                self.pool.snapshot()
            );
            for &i in &set {
                let server = &self.servers[i];
                let more = server.requests() + CALLS_PER_ADDRESS_SET;
                assert!(
                    server.wait_for_requests(more, WAIT).await,
                    "{} got no calls after it was resolved",
                    server.addr()
                );
            }
            self.changes += 1;
            if Instant::now() >= self.next_report {
                self.report("");
                self.next_report += REPORT_EVERY;
            }
        }
    }
}

/// The soak: for `SOAK_SECS` (default 20) seconds, servers recycle every connection after
/// 200 ms and the resolved addresses change as soon as the pool has settled on the last set;
/// in the first quarter only plain calls run, and not one may fail (GOAWAY and address changes
/// cost no call); in the rest, calls with short deadlines, dropped calls and dropped streams
/// join them, and the only failures are the deadline calls' DEADLINE_EXCEEDED or CANCELLED.
/// Afterwards resident memory is within [`RSS_SLACK_KIB`] of its level after the first
/// quarter, and once the pool is closed the runtime's alive tasks, the servers' open
/// connections and the process's file descriptors are back to their levels before the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak, run on demand: SOAK_SECS seconds (default 20)"]
async fn churn_leaves_nothing_behind() {
    // Logs per `RUST_LOG` (off by default), for diagnosing a failure.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_ansi(false)
        .try_init();
    let duration = soak_duration();
    let options = ServerOptions {
        max_connection_age: Some(MAX_CONNECTION_AGE),
        ..ServerOptions::default()
    };
    let servers: Vec<TestServer> = (0..SERVERS)
        .map(|i| {
            let last = 2 + u8::try_from(i).expect("few servers");
            TestServer::start_with(loopback(last), options.clone())
        })
        .collect();
    let tasks_before = alive_tasks();
    let fds_before = open_fds();
    let rss_before = rss_kib();

    let sets = AddressSets::new();
    let first: Vec<SocketAddr> = sets.current.iter().map(|&i| servers[i].addr()).collect();
    let resolver = Published::new(first.clone());
    // A name, not addresses: the pool re-resolves only targets that can change. Only
    // `Published` ever answers for it.
    let pool = builder("dns:///soak.test:50051")
        .resolver(resolver.clone())
        .connections_per_endpoint(CONNECTIONS_PER_ENDPOINT)
        .resolve_ttl_bounds(Duration::from_millis(100), Duration::from_millis(200))
        .min_reresolve_interval(Duration::from_millis(100))
        // A removed address's calls always finish: only cancellation may fail a call.
        .drain_timeout(WAIT)
        .build()
        .unwrap();
    wait_all_ready(&pool, CONNECTIONS_PER_ENDPOINT * first.len()).await;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_panic = StopOnDrop(stop.clone());
    let started = Instant::now();
    let mut soak = Soak {
        pool: &pool,
        resolver: &resolver,
        servers: &servers,
        tally: &tally,
        sets,
        started,
        initial_accepted: servers.iter().map(TestServer::accepted_connections).sum(),
        changes: 0,
        next_report: started + REPORT_EVERY,
        rss_samples: Vec::new(),
    };
    println!(
        "soak: {} s, {SERVERS} servers (max connection age {MAX_CONNECTION_AGE:?}), \
         before the pool: RSS {rss_before} KiB, {fds_before} fds, {tasks_before} tasks",
        duration.as_secs()
    );

    // Phase 1: churn without cancellation (no call may fail: checked at the end, so that a
    // long run always reports everything it measured).
    let mut callers = spawn_callers(&pool, Kind::Plain, PLAIN_WORKERS, &tally, &stop);
    soak.churn_until(started + duration / 4).await;
    soak.report(" (end of phase 1, no cancellation)");
    let rss_warm = rss_kib();
    let warm_failures = tally.failures();
    let warm_messages = tally.first_messages();
    let warm_calls = tally.calls.load(Ordering::Relaxed);
    let warm_reconnections = soak.reconnections();

    // Phase 2: the same churn, with deadlines, dropped calls and dropped streams.
    for (kind, workers) in [
        (Kind::Deadline, DEADLINE_WORKERS),
        (Kind::Dropped, DROPPING_WORKERS),
        (Kind::Stream, STREAM_WORKERS),
    ] {
        callers.extend(spawn_callers(&pool, kind, workers, &tally, &stop));
    }
    soak.churn_until(started + duration).await;
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.expect("caller");
    }
    soak.report(" (end of phase 2)");
    let rss_end = rss_kib();
    let reconnections = soak.reconnections();
    println!("soak: RSS over time (s, KiB): {:?}", soak.rss_samples);
    println!(
        "soak: first failure of each kind: {:?}",
        tally.first_messages()
    );

    // Back to the starting level.
    pool.close().await.expect("clean close");
    drop(pool);
    for server in &servers {
        assert!(
            server.wait_for_open_connections(0, WAIT).await,
            "{} still has {} connections open",
            server.addr(),
            server.open_connections()
        );
    }
    assert!(
        poll_until(|| alive_tasks() == tasks_before).await,
        "{} tasks alive, {tasks_before} before the pool",
        alive_tasks()
    );
    assert!(
        poll_until(|| open_fds() == fds_before).await,
        "{} file descriptors open, {fds_before} before the pool",
        open_fds()
    );
    assert!(
        rss_end <= rss_warm + RSS_SLACK_KIB,
        "resident memory grew from {rss_warm} KiB (warm) to {rss_end} KiB \
         (before the pool: {rss_before} KiB)"
    );
    println!(
        "soak: back to the start: {} tasks, 0 server connections, {} fds",
        alive_tasks(),
        open_fds()
    );

    // The churn happened, and cost only the calls that cancellation explains.
    assert!(
        warm_failures.is_empty(),
        "calls failed without any cancellation: {warm_failures:?} (first messages: \
         {warm_messages:?})"
    );
    let failures = tally.failures();
    let unexplained: Vec<_> = failures
        .iter()
        .filter(|(kind, code, _)| {
            // The pool fails a call whose deadline passes before the response headers with
            // DEADLINE_EXCEEDED; tonic's server answers one that outlives its grpc-timeout
            // with CANCELLED ("Timeout expired").
            !(*kind == Kind::Deadline && matches!(code, Code::DeadlineExceeded | Code::Cancelled))
        })
        .collect();
    assert!(
        unexplained.is_empty(),
        "failures that no cancellation explains: {unexplained:?} (all: {failures:?}; first \
         messages: {:?})",
        tally.first_messages()
    );
    let dropped = tally.dropped.load(Ordering::Relaxed);
    assert!(
        tally.calls.load(Ordering::Relaxed) > warm_calls && tally.failed_total() > 0 && dropped > 0,
        "phase 2 cancelled calls: {failures:?} failed, {dropped} dropped"
    );
    assert!(
        warm_reconnections > 0 && reconnections > warm_reconnections,
        "connections were recycled in both phases: {warm_reconnections}, then {reconnections}"
    );
}
