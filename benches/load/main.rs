//! Load scenarios S1–S7 of `benches/README.md`: a closed-loop load generator against echo
//! servers in separate processes, comparing a plain tonic `Channel`, tonic's
//! `Channel::balance_channel` and the [`Pool`](tonic_pool::Pool) side by side in one run.
//! Prints a markdown table and the bars.
//!
//! ```sh
//! cargo bench --bench load                                   # every scenario, ~7 minutes
//! LOAD_SCENARIOS=S1,S2 LOAD_SECS=3 LOAD_ROUNDS=3 cargo bench --bench load
//! # the metrics' cost: the same pool with and without a recorder, in one run
//! LOAD_SCENARIOS=S2 LOAD_MODES=channel,pool1,metrics1 LOAD_METRICS=1 cargo bench --bench load --features metrics
//! # the same against a build without the feature: two binaries, one S2 round per invocation
//! bash benches/metrics-cost.sh
//! ```
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `LOAD_SCENARIOS` | `S1,S2,S3,S4,S5,S6` (and `S2-TLS` with feature `tls`) | which scenarios to run, in this order (`S7` needs `--features health`) |
//! | `LOAD_SECS` | 3 | measured seconds per mode and round |
//! | `LOAD_WARMUP_SECS` | 1 | unmeasured load before each measurement (connections warm) |
//! | `LOAD_ROUNDS` | 5 | rounds; each round runs every mode of the scenario once |
//! | `LOAD_CLIENT_THREADS` | 2 | tokio worker threads of the load generator |
//! | `LOAD_MODES` | all | only these modes, by kind or kind and count, e.g. `channel,pool1` (to profile one), or a pool's policy (`least-request`, `peak-ewma`); ratios and bars need `channel` |
//! | `LOAD_METRICS` | — | `1`: after each `pool ×N` mode, run `pool+metrics ×N`, the same pool recording its metrics into a Prometheus recorder (needs `--features metrics`); `pool ×N` then has the feature compiled in and no recorder. See `recorder.rs` |
//! | `LOAD_POOL_SIZES` | — | replaces each scenario's `pool ×N` modes by these sizes, e.g. `1,2,4,8,16`; with three or more, the bench also writes `target/load/<scenario>-connections.svg`, req/s against connection count |
//! | `LOAD_RECORDER` | `summary` | with `LOAD_METRICS=1`: the recorder — `summary` (`metrics-exporter-prometheus` as it comes: quantile sketches), `a66` (the same with Prometheus histograms in gRFC A66's buckets) or `metrics-prometheus` (the `metrics-prometheus` crate's recorder: A66's buckets counted where a sample is recorded). See `recorder.rs` |
//! | `LOAD_CSV` | — | a file to append one line per mode and round to (created with a header line if new): `scenario,mode,round,rps,client_cpu_us_per_req,server_cpu_us_per_req,other_cores,features`, where `mode` is as printed and `features` the bench's build features that change what it measures (`metrics`, `tls`, `health`, joined by `+`; `none`). `benches/metrics-cost.sh` reads it |
//! | `LOAD_FIRST_ROUND` | 1 | the number of the first round: rounds are numbered from it in the progress lines and `LOAD_CSV`, and its parity decides the order of the modes (below). For a script that runs one round per invocation, as `benches/metrics-cost.sh` does |
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
//! - **Modes** alternate inside each round, each with fresh connections, so every mode sees
//!   the same machine conditions; every other round runs them in reverse (A B C, C B A,
//!   A B C, …: odd-numbered rounds forward, even-numbered ones reversed), so that a mode's
//!   place in the round — first after the previous round's pause, or last, after the other
//!   modes have warmed the caches and the allocator — cannot bias a paired ratio: over two
//!   rounds every mode has the same mean position. A mode's figure is the **median over the
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
//! | S3 | 127.0.0.2, `max_concurrent_streams` 100 | 1000 | 20 ms | channel, balance ×4, pool ×4, pool ×16, pool 1→16 |
//! | S4 | 127.0.0.2/3/4 | 64 | 1 ms | channel (one server), balance ×1/addr, pool ×1/addr |
//! | S5 | 127.0.0.2/3/4, .4 answers 20 ms later | 64 | 1 ms | channel (a fast server), balance ×1/addr (tower's p2c on pending requests), pool ×1/addr round robin, least request, PeakEWMA |
//! | S6 | 127.0.0.2/3/4, .4 fails every call (UNAVAILABLE), transport healthy | 64 | 1 ms | channel (a good server), pool ×1/addr round robin, least request, each of them with outlier ejection |
//! | S2-TLS | 127.0.0.2, TLS | 64 | 0 | as S2, every connection TLS (feature `tls`) |
//! | S7 | 127.0.0.2/3/4, health service; .4 turns NOT_SERVING mid-window | 64 | 1 ms | pool ×1/addr with `health_check("")` |
//!
//! `S2-TLS` is S2 over TLS 1.3 (rustls with `ring` on both sides; a certificate for
//! `bench.test` made at start with rcgen and handed to the server processes): the TLS `Channel`
//! and `balance` modes use tonic's `ClientTlsConfig` with that name, the pool modes
//! `PoolBuilder::tls` with `server_name("bench.test")`. Both pay rustls's cost per byte; the
//! ratio shows what the pool adds on top. It needs `--features tls`:
//! `LOAD_SCENARIOS=S2,S2-TLS cargo bench --bench load --features tls`.
//!
//! S7 (`health.rs`, feature `health`) is not a ratio: it reports failed calls and how long
//! after its flip to NOT_SERVING the flipped server still started a call (goal: 0 and
//! ≤ 100 ms).
//!
//! S6 is the failing-server scenario of issue 14: its bars are the share of failed calls
//! (round robin ~1/3; with outlier ejection < 1 % once the first interval has passed, which
//! the warm-up covers, under either policy: a server that fails fast looks idle to least
//! request, which alone sends it more than round robin does — ejection must cover that).
//!
//! S5 is the slow-server scenario of issue 14: its bars are the load-aware policies against
//! round robin and against `balance_channel`, per round (req/s ≥ 2.0× round robin's and ≥
//! `balance_channel`'s, p99 ≤ 0.5× round robin's).
//!
//! `pool 1→16` starts with one connection and may grow to 16 when its connections are full
//! (stream-limit awareness); the bench prints how far it grew.
//!
//! # Code
//!
//! - `main.rs` (this file): the settings, the modes and the scenario table;
//! - `server.rs`: the server processes (start, request counter, stop) and the `/proc` CPU
//!   readings, and what this binary does when it runs as a server;
//! - `drive.rs`: connecting in each mode and the closed-loop driver of one measured window;
//! - `report.rs`: medians over rounds, the tables, the bars and the SVG plot;
//! - `health.rs`: S7, one server turning NOT_SERVING under load (feature `health`).

use std::error::Error;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tonic_pool::Balance;

// The shared bench code lives beside the bench targets, not inside this one's directory.
#[path = "../common/mod.rs"]
mod common;
mod drive;
#[cfg(feature = "health")]
mod health;
#[cfg(feature = "metrics")]
mod recorder;
mod report;
mod server;

use drive::run_scenario;
use report::{print_report, write_connections_plot};

type BoxError = Box<dyn Error + Send + Sync>;

fn main() {
    if let Ok(addr) = std::env::var(server::SERVER_ENV) {
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
        if id == "S7" {
            // Not a ratio against a channel: its own verdict, printed by itself.
            #[cfg(feature = "health")]
            health::run(&rt, &settings)?;
            #[cfg(not(feature = "health"))]
            return Err("S7 needs the pool's health checking: add --features health".into());
            #[cfg(feature = "health")]
            continue;
        }
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
        if settings.metrics {
            scenario.modes = std::mem::take(&mut scenario.modes)
                .into_iter()
                .flat_map(|m| match m {
                    Mode::Pool(n) => vec![m, Mode::PoolMetrics(n)],
                    m => vec![m],
                })
                .collect();
            #[cfg(feature = "metrics")]
            recorder::install()?;
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
    // S7 alone prints its own verdict and leaves no table.
    if !reports.is_empty() {
        print_report(&settings, &reports, &load_before, &loadavg());
    }
    for report in &reports {
        write_connections_plot(report)?;
    }
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
    /// `LOAD_METRICS=1`: a `pool+metrics ×N` mode after each `pool ×N`.
    metrics: bool,
    /// `LOAD_CSV`: the file every run is appended to, one line per mode and round.
    csv: Option<PathBuf>,
    /// `LOAD_FIRST_ROUND`: the number of the first round (1-based); see [`Settings::round`].
    first_round: usize,
}

impl Settings {
    fn from_env(bench: bool) -> Result<Self, BoxError> {
        use common::env_var as var;
        let (secs, warmup, rounds) = if bench { (3.0, 1.0, 5) } else { (0.3, 0.2, 1) };
        let all = if cfg!(feature = "tls") {
            "S1,S2,S3,S4,S5,S6,S2-TLS"
        } else {
            "S1,S2,S3,S4,S5,S6"
        };
        let scenarios = var("LOAD_SCENARIOS", all.to_owned())?
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
        let metrics = var("LOAD_METRICS", 0u8)? == 1;
        if metrics && cfg!(not(feature = "metrics")) {
            return Err("LOAD_METRICS=1 needs --features metrics".into());
        }
        let settings = Self {
            metrics,
            csv: std::env::var_os("LOAD_CSV")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            first_round: var("LOAD_FIRST_ROUND", 1)?,
            pool_sizes,
            scenarios,
            modes,
            measure: Duration::try_from_secs_f64(var("LOAD_SECS", secs)?)?,
            warmup: Duration::try_from_secs_f64(var("LOAD_WARMUP_SECS", warmup)?)?,
            rounds: var("LOAD_ROUNDS", rounds)?,
            client_threads: var("LOAD_CLIENT_THREADS", 2)?,
            smoke: !bench,
        };
        if settings.rounds == 0
            || settings.client_threads == 0
            || settings.measure.is_zero()
            || settings.first_round == 0
        {
            return Err(
                "LOAD_ROUNDS, LOAD_CLIENT_THREADS, LOAD_SECS and LOAD_FIRST_ROUND must be > 0"
                    .into(),
            );
        }
        Ok(settings)
    }

    /// The number of the `i`-th round (from 0) of this run, as the progress lines and
    /// `LOAD_CSV` give it: counted from `LOAD_FIRST_ROUND`.
    fn round(&self, i: usize) -> usize {
        self.first_round + i
    }

    /// The number of this run's last round.
    fn last_round(&self) -> usize {
        self.round(self.rounds - 1)
    }

    /// Whether round number `round` runs the modes in reverse: every even-numbered one, so
    /// that over two rounds each mode has the same mean position (see the module doc).
    fn reversed(round: usize) -> bool {
        round.is_multiple_of(2)
    }

    /// The build features that change what the bench measures, for `LOAD_CSV`: `metrics`
    /// (the pool's metrics compiled in), `tls`, `health`, joined by `+`; `none` without them.
    fn features() -> String {
        let on: Vec<&str> = [
            ("metrics", cfg!(feature = "metrics")),
            ("tls", cfg!(feature = "tls")),
            ("health", cfg!(feature = "health")),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
        if on.is_empty() {
            "none".to_owned()
        } else {
            on.join("+")
        }
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
    /// The same, recording its metrics (`LOAD_METRICS=1`, feature `metrics`).
    PoolMetrics(usize),
    /// `tonic_pool::Pool` starting with one connection per server and allowed to grow to this
    /// many when its connections are full (stream-limit awareness).
    PoolGrow(usize),
    /// `tonic_pool::Pool` with one connection per server and this balancing policy.
    PoolWith(Balance),
    /// `tonic_pool::Pool` with one connection per server, this policy, and outlier ejection
    /// (S6; see `drive::s6_outlier_detection`).
    PoolOutlier(Balance),
}

impl Mode {
    /// Whether `LOAD_MODES`' `token` names this mode: its kind (`channel`, `balance`,
    /// `pool`) or its kind and connection count (`balance4`, `pool1`).
    fn matches(self, token: &str) -> bool {
        let (kind, n) = match self {
            Mode::Channel => ("channel", 1),
            Mode::Balance(n) => ("balance", n),
            Mode::Pool(n) => ("pool", n),
            Mode::PoolMetrics(n) => ("metrics", n),
            Mode::PoolGrow(n) => ("grow", n),
            Mode::PoolWith(balance) => return token == policy_name(balance),
            Mode::PoolOutlier(balance) => {
                return token == format!("outlier-{}", policy_name(balance))
            }
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
            Mode::PoolMetrics(n) => write!(f, "pool+metrics ×{n}"),
            Mode::PoolGrow(n) => write!(f, "pool 1→{n}"),
            Mode::PoolWith(balance) => write!(f, "pool {}", policy_name(*balance)),
            Mode::PoolOutlier(balance) => {
                write!(f, "pool {} + ejection", policy_name(*balance))
            }
        }
    }
}

/// A pool policy as the tables and `LOAD_MODES` name it.
fn policy_name(balance: Balance) -> &'static str {
    match balance {
        Balance::RoundRobin => "round-robin",
        Balance::LeastRequest => "least-request",
        Balance::PeakEwma => "peak-ewma",
        Balance::PickFirst => "pick-first",
        _ => "other",
    }
}

/// One load scenario of `benches/README.md`.
#[derive(Debug)]
struct Scenario {
    id: &'static str,
    /// Last octets of the servers' loopback addresses (127.0.0.x).
    servers: &'static [u8],
    concurrency: usize,
    sleep_ms: u32,
    /// Added by the last server to every call: a server slower than the others (S5).
    slow_ms: u32,
    /// Whether the last server fails every unary call at once with UNAVAILABLE, its transport
    /// healthy (S6).
    failing_last: bool,
    max_concurrent_streams: Option<u32>,
    /// Whether every connection is TLS (servers and clients alike).
    tls: bool,
    /// The modes; the first is the plain `Channel` baseline, the first `Pool` is the one the
    /// bars judge.
    modes: Vec<Mode>,
}

impl Scenario {
    /// The scenarios of `benches/README.md`.
    fn all() -> Vec<Self> {
        let scenario = |id, servers, concurrency, sleep_ms, max_concurrent_streams, modes| Self {
            id,
            servers,
            concurrency,
            sleep_ms,
            slow_ms: 0,
            failing_last: false,
            max_concurrent_streams,
            tls: false,
            modes,
        };
        use Mode::{Balance, Channel, Pool, PoolGrow, PoolOutlier, PoolWith};
        #[allow(unused_mut)] // S2-TLS is added only with the `tls` feature.
        let mut all = vec![
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
            Self {
                slow_ms: 20,
                ..scenario(
                    "S5",
                    &[2, 3, 4],
                    64,
                    1,
                    None,
                    vec![
                        Channel,
                        Balance(1),
                        Pool(1),
                        PoolWith(tonic_pool::Balance::LeastRequest),
                        PoolWith(tonic_pool::Balance::PeakEwma),
                    ],
                )
            },
            Self {
                failing_last: true,
                ..scenario(
                    "S6",
                    &[2, 3, 4],
                    64,
                    1,
                    None,
                    vec![
                        Channel,
                        Pool(1),
                        PoolWith(tonic_pool::Balance::LeastRequest),
                        PoolOutlier(tonic_pool::Balance::RoundRobin),
                        PoolOutlier(tonic_pool::Balance::LeastRequest),
                    ],
                )
            },
        ];
        #[cfg(feature = "tls")]
        all.push(Self {
            id: "S2-TLS",
            tls: true,
            ..scenario(
                "S2-TLS",
                &[2],
                64,
                0,
                None,
                vec![Channel, Balance(1), Pool(1), Pool(4)],
            )
        });
        all
    }

    fn by_id(id: &str) -> Option<Self> {
        Self::all().into_iter().find(|s| s.id == id)
    }
}
