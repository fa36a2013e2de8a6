//! Micro benchmarks of the pool (criterion): what choosing a connection, republishing the
//! picker and one RPC through the pool cost.
//!
//! ```sh
//! cargo bench --features bench-internals --bench pool -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! - **`pick/single/N`**: one [`Picker::pick`] over `N` Ready entries (1 … 1024), one thread.
//!   Entries are `Arc`s to a struct with an `AtomicBool`, as the pool's are (`Arc<Connection>`,
//!   whose availability is an atomic load); the bench wraps the `Arc` in a newtype only
//!   because the orphan rule forbids implementing `Pickable` for a foreign `Arc<_>`.
//! - **`pick/grouped4/N`**: the same with the `N` entries in addresses of 4 connections each,
//!   where round robin goes per address, then per connection (an index into the snapshot's
//!   precomputed turn).
//! - **`pick/least_request/N`**, **`pick/peak_ewma/N`**: one pick of the two-choice policies
//!   over `N` single-connection addresses (two random draws, the entries' in-flight counters;
//!   PeakEWMA also reads the clock once).
//! - **`pick/contended/N`**: 2 OS threads pick from one picker through one shared cursor, the
//!   pool's situation when two runtime workers make calls at once. Each thread does `iters`
//!   picks; the wall time from a common start (a barrier) to the last join is divided by 2, so
//!   the reported time is wall time per pick over both threads (throughput: picks per second
//!   summed over the threads). Thread start-up is outside the timed span.
//! - **`republish/1024`**: what the registry does to publish the Ready set: collect 1024
//!   `Arc` clones into a `Vec`, box it into a `Picker` behind a new `Arc` — and drop the
//!   previous picker (1024 `Arc` decrements), which the pool also pays eventually.
//! - **`republish/16000`**: the same for a fleet of 250 addresses × 64 connections, grouped by
//!   address. Pools of up to 256 Ready connections publish every change; larger ones only
//!   the changes calls need at once, and one batch for the rest (`registry.rs`).
//! - **`call_overhead/*`**: one unary RPC (32-byte payload) through a generated `EchoClient`
//!   to an in-process tonic echo server, on a current-thread tokio runtime, so that client
//!   and server CPU are both counted, on one core, without cross-thread wake-ups:
//!   - `direct`: the client calls the server's `EchoServer` service in memory (no HTTP/2):
//!     the gRPC encode/decode floor;
//!   - `channel`: a tonic `Channel` (`Endpoint::connect_with_connector`) over a
//!     `tokio::io::duplex` pipe to a tonic `Server` fed by `serve_with_incoming`;
//!   - `pool`: a [`Pool`] with one connection whose connector returns a duplex half to the
//!     same kind of server.
//!
//!   `pool - channel` is what sending on h2 directly from the caller's task (the pool) costs
//!   more, or less, than tonic's `Channel` (`Buffer` + `Reconnect` + hyper's client) per RPC. The `/1`
//!   variants make one call at a time; the `/32` variants keep 32 calls in flight from 32
//!   tasks and report the time per call (CPU-bound throughput, wake-ups amortised).
//! - **`recorder/alone`, `recorder/contended`** (feature `metrics`): what
//!   `metrics-exporter-prometheus` charges for the metric operations of one call (a counter
//!   increment and four histogram samples), on one thread and on two threads recording into
//!   the same handles at once — the part of the metrics' cost that is the recorder's;
//!   `recorder/batched-alone`, `recorder/batched-contended`: the same operations as a pool
//!   makes them, through its per-thread shards (`src/metrics/batch.rs`).
//! - **paired call overhead** (printed after criterion's summary): criterion measures one
//!   mode after the other, so on a shared machine its `pool` and `channel` figures can be
//!   minutes and a load change apart. As `benches/README.md` asks for ratios measured side by
//!   side, the three modes then run again in alternating rounds (`CALL_PAIRED_ROUNDS`,
//!   default 21, of 2 000 calls per mode; 0 skips it) and the median (min–max) of the
//!   per-round `pool / channel` ratios is printed as a markdown table. It runs whatever
//!   criterion filter is given, and not in `cargo test --benches`.
//!
//!   With `--features metrics` a fourth mode joins the rounds: `pool+metrics`, a pool built
//!   after a Prometheus recorder (`metrics-exporter-prometheus`) was installed, so that it
//!   records every metric; `pool` then has the feature compiled in and no recorder (its
//!   handles are no-ops). `pool+metrics / pool` is what recording costs per call.
//! - **one mode alone, for instruction counts**: with `CALL_ONLY=direct|channel|pool`
//!   (`pool-metrics` with the `metrics` feature: the recording pool), the bench
//!   makes 200 warm-up calls and then `CALL_COUNT` (default 2 000) calls, one at a time, in that
//!   mode only, and exits without running criterion. Under
//!   `valgrind --tool=callgrind`, the difference between two counts (say 1 000 and 3 000 calls)
//!   divided by the difference in calls is the instructions per call, client and server
//!   together — a figure a noisy machine does not move.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::client::GrpcService;
use tonic::transport::{Endpoint, Server};
use tonic_pool::__bench::{Pickable, Picker};
use tonic_pool::connector::{BoxedIo, Connect, Destination};
use tonic_pool::resolve::BoxFuture;
use tonic_pool::{Balance, Pool};

mod common;

use common::echo::echo_client::EchoClient;
use common::echo::echo_server::EchoServer;
use common::{request, BenchEcho};

/// Picker sizes: the pool allows 1..=1024 connections per address.
const SIZES: [usize; 6] = [1, 4, 16, 64, 256, 1024];

/// Buffer of each `tokio::io::duplex` pipe, per direction.
const DUPLEX_BUFFER: usize = 64 * 1024;

/// Calls kept in flight by the `/32` call-overhead variants.
const CONCURRENT_CALLS: u64 = 32;

// === pick ===

/// What the picker holds for one connection: an `Arc` to a struct with an atomic flag and an
/// in-flight counter.
#[derive(Debug)]
struct Conn {
    closing: AtomicBool,
    in_flight: AtomicUsize,
}

/// `Arc<Conn>` in a newtype, only to be allowed to implement `Pickable` (same size and
/// indirection as the pool's `Arc<Connection>`).
#[derive(Debug, Clone)]
struct Entry(Arc<Conn>);

impl Pickable for Entry {
    #[inline]
    fn is_available(&self) -> bool {
        !self.0.closing.load(Ordering::Acquire)
    }

    #[inline]
    fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::Relaxed)
    }
}

fn entries(n: usize) -> Vec<Entry> {
    (0..n)
        .map(|_| {
            Entry(Arc::new(Conn {
                closing: AtomicBool::new(false),
                in_flight: AtomicUsize::new(0),
            }))
        })
        .collect()
}

fn bench_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    group.throughput(Throughput::Elements(1));
    for n in SIZES {
        let picker = Picker::new(entries(n));
        let cursor = AtomicUsize::new(0);
        group.bench_with_input(BenchmarkId::new("single", n), &n, |b, _| {
            b.iter(|| {
                std::hint::black_box(picker.pick(std::hint::black_box(&cursor)));
            });
        });
    }
    for n in SIZES.into_iter().filter(|&n| n >= 8) {
        let by_address = entries(n)
            .chunks(4)
            .map(<[Entry]>::to_vec)
            .collect::<Vec<_>>();
        let picker = Picker::build(Balance::RoundRobin, by_address);
        let cursor = AtomicUsize::new(0);
        group.bench_with_input(BenchmarkId::new("grouped4", n), &n, |b, _| {
            b.iter(|| {
                std::hint::black_box(picker.pick(std::hint::black_box(&cursor)));
            });
        });
    }
    for (name, balance) in [
        ("least_request", Balance::LeastRequest),
        ("peak_ewma", Balance::PeakEwma),
    ] {
        for n in [4, 64, 1024] {
            let picker = Picker::build(balance, entries(n).into_iter().map(|e| vec![e]));
            let cursor = AtomicUsize::new(0);
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    std::hint::black_box(picker.pick(std::hint::black_box(&cursor)));
                });
            });
        }
    }
    for n in SIZES {
        let picker = Picker::new(entries(n));
        let cursor = AtomicUsize::new(0);
        group.bench_with_input(BenchmarkId::new("contended", n), &n, |b, _| {
            b.iter_custom(|iters| contended_picks(&picker, &cursor, iters));
        });
    }
    group.finish();
}

/// Two threads each do `iters` picks on one shared cursor; returns wall time per pick × iters.
fn contended_picks(picker: &Picker<Entry>, cursor: &AtomicUsize, iters: u64) -> Duration {
    const THREADS: u32 = 2;
    let start = Barrier::new(THREADS as usize + 1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    for _ in 0..iters {
                        std::hint::black_box(picker.pick(std::hint::black_box(cursor)));
                    }
                })
            })
            .collect();
        start.wait();
        let began = Instant::now();
        for worker in workers {
            worker.join().expect("pick thread panicked");
        }
        began.elapsed() / THREADS
    })
}

// === republish ===

fn bench_republish(c: &mut Criterion) {
    const N: usize = 1024;
    let mut group = c.benchmark_group("republish");
    group.throughput(Throughput::Elements(1));
    // The registry keeps one `Option<Arc<Connection>>` per connection slot and collects the
    // Ready ones; these slots are all Ready.
    let slots: Vec<Option<Entry>> = entries(N).into_iter().map(Some).collect();
    let collect = || -> Vec<Entry> { slots.iter().flatten().cloned().collect() };
    // The published picker, replaced (and the old one dropped) on each iteration.
    let mut published = Arc::new(Picker::new(collect()));
    group.bench_function(BenchmarkId::from_parameter(N), |b| {
        b.iter(|| {
            published = Arc::new(Picker::new(std::hint::black_box(collect())));
        });
    });
    std::hint::black_box(published.len());
    // A fleet: 250 addresses × 64 connections, grouped by address as the registry builds it.
    // What one publication costs there; the registry publishes at once only the changes calls
    // need at once, and batches the others (see `registry.rs`, "Cost per change").
    const ADDRESSES: usize = 250;
    const PER_ADDRESS: usize = 64;
    let fleet: Vec<Option<Entry>> = entries(ADDRESSES * PER_ADDRESS)
        .into_iter()
        .map(Some)
        .collect();
    let by_address = || -> Vec<Vec<Entry>> {
        fleet
            .chunks(PER_ADDRESS)
            .map(|slots| slots.iter().flatten().cloned().collect())
            .collect()
    };
    let mut published = Arc::new(Picker::build(Balance::RoundRobin, by_address()));
    group.bench_function(BenchmarkId::from_parameter(ADDRESSES * PER_ADDRESS), |b| {
        b.iter(|| {
            published = Arc::new(Picker::build(
                Balance::RoundRobin,
                std::hint::black_box(by_address()),
            ));
        });
    });
    std::hint::black_box(published.len());
    group.finish();
}

// === what a recorder charges per call ===

/// The metric operations a pool makes per call with the `metrics` feature: one counter
/// increment (`grpc.client.attempt.started`) and four histogram samples (attempt duration,
/// sent and received sizes, call duration), on handles registered once.
#[cfg(feature = "metrics")]
struct CallHandles {
    started: metrics::Counter,
    histograms: [metrics::Histogram; 4],
}

#[cfg(feature = "metrics")]
impl CallHandles {
    fn register(recorder: &impl metrics::Recorder) -> Self {
        metrics::with_local_recorder(recorder, || {
            let labels = [("grpc.method", "echo.Echo/Unary"), ("grpc.status", "OK")];
            Self {
                started: metrics::counter!("grpc.client.attempt.started", &labels[..1]),
                histograms: [
                    metrics::histogram!("grpc.client.attempt.duration", &labels),
                    metrics::histogram!(
                        "grpc.client.attempt.sent_total_compressed_message_size",
                        &labels
                    ),
                    metrics::histogram!(
                        "grpc.client.attempt.rcvd_total_compressed_message_size",
                        &labels
                    ),
                    metrics::histogram!("grpc.client.call.duration", &labels),
                ],
            }
        })
    }

    #[inline]
    fn one_call(&self) {
        self.started.increment(1);
        for (i, histogram) in self.histograms.iter().enumerate() {
            histogram.record(std::hint::black_box(i as f64));
        }
    }
}

/// `recorder/*` (feature `metrics`): what `metrics-exporter-prometheus` charges for one
/// call's metric operations ([`CallHandles::one_call`]) — `alone` on one thread, `contended`
/// on two threads recording into the same handles at once (the time per call on each
/// thread), as a pool's calls do from two runtime workers. The recorder's samples are drained
/// (its upkeep) between batches, outside the timed span, as its exporter does every 5 s.
#[cfg(feature = "metrics")]
fn bench_recorder(c: &mut Criterion) {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let handles = CallHandles::register(&recorder);
    let mut group = c.benchmark_group("recorder");
    group.throughput(Throughput::Elements(1));
    group.bench_function("alone", |b| {
        b.iter_custom(|iters| {
            let took = time_per_thread(1, iters, |_| handles.one_call());
            handle.run_upkeep();
            took
        });
    });
    group.bench_function("contended", |b| {
        b.iter_custom(|iters| {
            let took = time_per_thread(2, iters, |_| handles.one_call());
            handle.run_upkeep();
            took
        });
    });
    // The same operations as a pool makes them: the start counted in its thread's shard, the
    // end into the shard's batch, which reaches the recorder 64 at a time
    // (`src/metrics/batch.rs`). What a batch left at the end (fewer than 64 calls a thread)
    // and the starts no full batch took (a full batch takes its method's starts counted in
    // its shard: one increment per batch, not per call) are flushed outside the timed span.
    let samples = metrics::with_local_recorder(&recorder, || {
        tonic_pool::__bench::CallSamples::new("dns:///bench:50051")
    });
    for (name, threads) in [("batched-alone", 1), ("batched-contended", 2)] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let took = time_per_thread(threads, iters, |i| {
                    samples.one_call(std::hint::black_box(i))
                });
                samples.flush();
                handle.run_upkeep();
                took
            });
        });
    }
    group.finish();
}

/// Runs `one_call(i)` for `i` in `0..iters` on each of `threads` threads started together,
/// and returns the mean of their times: the time per call on each thread.
#[cfg(feature = "metrics")]
fn time_per_thread(threads: usize, iters: u64, one_call: impl Fn(u64) + Sync) -> Duration {
    let start = Barrier::new(threads + 1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (start, one_call) = (&start, &one_call);
                scope.spawn(move || {
                    start.wait();
                    let began = Instant::now();
                    for i in 0..iters {
                        one_call(i);
                    }
                    began.elapsed()
                })
            })
            .collect();
        start.wait();
        let per_thread: Vec<Duration> = workers
            .into_iter()
            .map(|w| w.join().expect("recording thread panicked"))
            .collect();
        per_thread.iter().sum::<Duration>() / threads as u32
    })
}

// === call overhead ===

/// A pool connector that opens a `tokio::io::duplex` pipe and hands its other half to the
/// in-process server; the destination address is ignored.
#[derive(Debug, Clone)]
struct DuplexConnector {
    server: mpsc::UnboundedSender<DuplexStream>,
}

impl DuplexConnector {
    fn open(&self) -> io::Result<DuplexStream> {
        let (client, server) = tokio::io::duplex(DUPLEX_BUFFER);
        self.server
            .send(server)
            .map_err(|_| io::Error::new(io::ErrorKind::ConnectionRefused, "server is gone"))?;
        Ok(client)
    }
}

impl Connect for DuplexConnector {
    fn connect(&self, _dst: &Destination) -> BoxFuture<'static, io::Result<BoxedIo>> {
        let opened = self.open();
        Box::pin(async move { Ok(Box::new(opened?) as BoxedIo) })
    }
}

/// Starts a tonic echo server fed with duplex halves; returns the connector that reaches it.
fn spawn_duplex_server() -> DuplexConnector {
    let (tx, rx) = mpsc::unbounded_channel::<DuplexStream>();
    let incoming = UnboundedReceiverStream::new(rx).map(Ok::<_, io::Error>);
    tokio::spawn(
        Server::builder()
            .add_service(EchoServer::new(BenchEcho::default()))
            .serve_with_incoming(incoming),
    );
    DuplexConnector { server: tx }
}

/// Runs `iters` unary calls, `tasks` at a time (each task its own client clone); returns the
/// wall time, i.e. the time per call × `iters` when the calls overlap.
async fn calls<T>(client: &EchoClient<T>, iters: u64, tasks: u64) -> Duration
where
    T: GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Future: Send,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let began = Instant::now();
    if tasks == 1 {
        let mut client = client.clone();
        for _ in 0..iters {
            let reply = client.unary(request(0)).await.expect("unary call");
            std::hint::black_box(reply);
        }
        return began.elapsed();
    }
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        // Split `iters` as evenly as possible over the tasks.
        let share = iters / tasks + u64::from(t < iters % tasks);
        let mut client = client.clone();
        set.spawn(async move {
            for _ in 0..share {
                let reply = client.unary(request(0)).await.expect("unary call");
                std::hint::black_box(reply);
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.expect("call task panicked");
    }
    began.elapsed()
}

/// The three ways of calling the in-process echo server.
struct Clients {
    direct: EchoClient<EchoServer<BenchEcho>>,
    channel: EchoClient<tonic::transport::Channel>,
    pool: EchoClient<Pool>,
}

impl Clients {
    /// Starts the servers and connects (inside `rt`: the servers and the pool run there).
    fn connect(rt: &tokio::runtime::Runtime) -> Self {
        rt.block_on(async {
            let direct = EchoClient::new(EchoServer::new(BenchEcho::default()));

            let to_channel = spawn_duplex_server();
            let channel = Endpoint::from_static("http://127.0.0.1:1")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let opened = to_channel.open();
                    async move { opened.map(TokioIo::new) }
                }))
                .await
                .expect("channel over duplex");

            let pool = Pool::builder("static:///127.0.0.1:1")
                .connector(spawn_duplex_server())
                .build()
                .expect("pool");
            pool.wait_ready(Duration::from_secs(5))
                .await
                .expect("pool ready");
            Self {
                direct,
                channel: EchoClient::new(channel),
                pool: EchoClient::new(pool),
            }
        })
    }
}

fn bench_call_overhead(c: &mut Criterion, rt: &tokio::runtime::Runtime, clients: &Clients) {
    for tasks in [1, CONCURRENT_CALLS] {
        let mut group = c.benchmark_group("call_overhead");
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("direct", tasks), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let client = &clients.direct;
                async move { calls(client, iters, tasks).await }
            });
        });
        group.bench_function(BenchmarkId::new("channel", tasks), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let client = &clients.channel;
                async move { calls(client, iters, tasks).await }
            });
        });
        group.bench_function(BenchmarkId::new("pool", tasks), |b| {
            b.to_async(rt).iter_custom(|iters| {
                let client = &clients.pool;
                async move { calls(client, iters, tasks).await }
            });
        });
        group.finish();
    }
}

/// The call-overhead comparison the way `benches/README.md` asks for ratios: the three modes
/// alternate in short rounds (`CALLS_PER_ROUND` calls each, the order rotating every round),
/// so that a noisy neighbour slows all of them alike; prints the median time per call and the
/// median (min–max) of the per-round `pool / channel` ratios. Criterion's figures above come
/// from one mode after the other and drift with the machine's load.
fn paired_call_overhead(rt: &tokio::runtime::Runtime, clients: &Clients, rounds: usize) {
    const CALLS_PER_ROUND: u64 = 2_000;
    // With the `metrics` feature, a fourth mode: a pool recording into Prometheus, paired
    // with `pool` (the feature compiled in, no recorder).
    #[cfg(feature = "metrics")]
    let recording = Some(rt.block_on(metrics_pool()));
    #[cfg(not(feature = "metrics"))]
    let recording: Option<EchoClient<Pool>> = None;
    let modes = if recording.is_some() { 4 } else { 3 };
    println!(
        "\ncall_overhead, paired: {rounds} rounds of {CALLS_PER_ROUND} calls per mode, modes alternating\n"
    );
    if recording.is_some() {
        println!("| calls in flight | direct µs/call | channel µs/call | pool µs/call | pool / channel (min–max) | pool+metrics µs/call | pool+metrics / pool (min–max) |");
        println!("|---|---|---|---|---|---|---|");
    } else {
        println!("| calls in flight | direct µs/call | channel µs/call | pool µs/call | pool / channel (min–max) |");
        println!("|---|---|---|---|---|");
    }
    for tasks in [1, CONCURRENT_CALLS] {
        // times[mode][round], µs per call; mode 0 direct, 1 channel, 2 pool, 3 pool+metrics.
        let mut times: [Vec<f64>; 4] = Default::default();
        let recording = recording.as_ref();
        let run = |mode: usize| async move {
            match mode {
                0 => calls(&clients.direct, CALLS_PER_ROUND, tasks).await,
                1 => calls(&clients.channel, CALLS_PER_ROUND, tasks).await,
                2 => calls(&clients.pool, CALLS_PER_ROUND, tasks).await,
                _ => {
                    let client = recording.expect("the fourth mode has a pool");
                    calls(client, CALLS_PER_ROUND, tasks).await
                }
            }
        };
        rt.block_on(async {
            // One unmeasured round warms every mode.
            for mode in 0..modes {
                run(mode).await;
            }
            for round in 0..rounds {
                for k in 0..modes {
                    let mode = (round + k) % modes;
                    let took = run(mode).await;
                    times[mode].push(took.as_secs_f64() * 1e6 / CALLS_PER_ROUND as f64);
                }
            }
        });
        let paired = |a: usize, b: usize| {
            let ratios: Vec<f64> = times[a].iter().zip(&times[b]).map(|(x, y)| x / y).collect();
            common::stats(ratios)
        };
        let (ratio, lo, hi) = paired(2, 1);
        print!(
            "| {tasks} | {:.2} | {:.2} | {:.2} | {ratio:.3}× ({lo:.3}–{hi:.3}) |",
            common::stats(times[0].iter().copied()).0,
            common::stats(times[1].iter().copied()).0,
            common::stats(times[2].iter().copied()).0,
        );
        if modes == 4 {
            let (ratio, lo, hi) = paired(3, 2);
            print!(
                " {:.2} | {ratio:.3}× ({lo:.3}–{hi:.3}) |",
                common::stats(times[3].iter().copied()).0
            );
        }
        println!();
    }
}

/// A pool like [`Clients`]' one, built after a Prometheus recorder was installed as the
/// global recorder, so that it records every metric (with the `metrics` feature). Pools
/// built before that got no-op handles: `pool` then measures the feature compiled in
/// without a recorder. The recorder is installed once and stays for the process.
#[cfg(feature = "metrics")]
async fn metrics_pool() -> EchoClient<Pool> {
    static RECORDER: std::sync::Once = std::sync::Once::new();
    RECORDER.call_once(|| {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::set_global_recorder(recorder).expect("no other global recorder");
    });
    let pool = Pool::builder("static:///127.0.0.1:1")
        .connector(spawn_duplex_server())
        .build()
        .expect("pool");
    pool.wait_ready(Duration::from_secs(5))
        .await
        .expect("pool ready");
    EchoClient::new(pool)
}

/// `CALL_ONLY`: `count` calls in one mode, after a warm-up (see the module docs).
fn one_mode_alone(mode: &str, count: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let clients = Clients::connect(&rt);
    let took = rt.block_on(async {
        match mode {
            "direct" => {
                calls(&clients.direct, 200, 1).await;
                calls(&clients.direct, count, 1).await
            }
            "channel" => {
                calls(&clients.channel, 200, 1).await;
                calls(&clients.channel, count, 1).await
            }
            "pool" => {
                calls(&clients.pool, 200, 1).await;
                calls(&clients.pool, count, 1).await
            }
            #[cfg(feature = "metrics")]
            "pool-metrics" => {
                let pool = metrics_pool().await;
                calls(&pool, 200, 1).await;
                calls(&pool, count, 1).await
            }
            other => panic!("CALL_ONLY={other:?}: expected direct, channel, pool or pool-metrics"),
        }
    });
    println!(
        "{mode}: {count} calls, {:.2} µs/call",
        took.as_secs_f64() * 1e6 / count as f64
    );
}

// What `criterion_group!` + `criterion_main!` expand to, written out so that no undocumented
// `pub fn` is generated.
fn main() {
    if let Ok(mode) = std::env::var("CALL_ONLY") {
        let count = std::env::var("CALL_COUNT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2_000);
        return one_mode_alone(&mode, count);
    }
    let mut c = Criterion::default().configure_from_args();
    bench_pick(&mut c);
    bench_republish(&mut c);
    #[cfg(feature = "metrics")]
    bench_recorder(&mut c);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let clients = Clients::connect(&rt);
    bench_call_overhead(&mut c, &rt, &clients);
    c.final_summary();
    // Only in a real run (`cargo bench` passes `--bench`), not in `cargo test --benches`.
    let rounds = std::env::var("CALL_PAIRED_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(21);
    if rounds > 0 && std::env::args().any(|a| a == "--bench") {
        paired_call_overhead(&rt, &clients, rounds);
    }
}
