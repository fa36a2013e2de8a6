//! The closed-loop load generator: connects in each mode, drives C callers through a warm-up
//! and the measured window, and reads CPU and server counters at the window's edges.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tonic::client::GrpcService;
use tonic::transport::channel::Change;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_pool::{Balance, FailurePercentageEjection, OutlierDetection, Pool, SuccessRateEjection};

use crate::common::echo::echo_client::EchoClient;
use crate::common::request;
use crate::report::{append_csv, fmt_errors, fmt_us, percentile, ScenarioReport};
use crate::server::{machine_busy, process_cpu, server_counters, BenchTls, ServerProc, TLS_NAME};
use crate::{BoxError, Mode, Scenario, Settings};

/// Bound on every setup wait (server start, connections Ready).
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two measured runs, for the previous run's connections to close.
const SETTLE: Duration = Duration::from_millis(200);

/// The outcome of one mode in one round.
#[derive(Debug, Clone)]
pub(crate) struct RunResult {
    pub(crate) rps: f64,
    /// The share of the window's calls that failed.
    pub(crate) failed: f64,
    /// p50, p90, p99, max, in µs.
    pub(crate) p50: u32,
    pub(crate) p90: u32,
    pub(crate) p99: u32,
    pub(crate) max: u32,
    pub(crate) errors: BTreeMap<String, u64>,
    pub(crate) client_cpu_us: f64,
    pub(crate) server_cpu_us: f64,
    /// Least-served over most-served server, when there are several servers.
    pub(crate) share: Option<f64>,
    /// CPU used by everything else on the machine during the window, in cores (the machine is
    /// shared: a busy neighbour makes a run unreliable).
    pub(crate) other_cores: f64,
}

/// What each load task brings back.
#[derive(Debug, Default)]
struct TaskTally {
    latencies: Vec<u32>,
    errors: BTreeMap<String, u64>,
}

pub(crate) fn run_scenario(
    rt: &tokio::runtime::Runtime,
    scenario: &Scenario,
    settings: &Settings,
) -> Result<ScenarioReport, BoxError> {
    let tls = scenario.tls.then(BenchTls::generate).transpose()?;
    let mut servers = scenario
        .servers
        .iter()
        .enumerate()
        .map(|(i, &last)| {
            let last_one = i + 1 == scenario.servers.len();
            ServerProc::spawn(
                Ipv4Addr::new(127, 0, 0, last),
                scenario.max_concurrent_streams,
                tls.as_ref(),
                if last_one { scenario.slow_ms } else { 0 },
                last_one && scenario.failing_last,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut runs: Vec<Vec<RunResult>> = vec![Vec::new(); scenario.modes.len()];
    for round in (0..settings.rounds).map(|i| settings.round(i)) {
        // Forward or reversed (see `Settings::reversed`); `runs` stays indexed by mode, so
        // the ratios remain paired within the round.
        let mut order: Vec<usize> = (0..scenario.modes.len()).collect();
        if Settings::reversed(round) {
            order.reverse();
        }
        for i in order {
            let mode = scenario.modes[i];
            let result = rt.block_on(run_mode(
                scenario,
                mode,
                settings,
                tls.as_ref(),
                &mut servers,
            ))?;
            eprintln!(
                "[{} round {}/{}] {:<10} {:>9.0} req/s  p50 {:>8}  p99 {:>8}  client {:>5.1} µs/req  \
                 errors {}  other processes {:.2} cores",
                scenario.id,
                round,
                settings.last_round(),
                mode.to_string(),
                result.rps,
                fmt_us(result.p50),
                fmt_us(result.p99),
                result.client_cpu_us,
                fmt_errors(&result.errors),
                result.other_cores,
            );
            if let Some(csv) = &settings.csv {
                append_csv(csv, scenario.id, mode, round, &result)?;
            }
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

/// S6's outlier ejection: gRFC A50's defaults, except what three servers and a 1 s warm-up
/// need — a 500 ms interval (the first evaluation falls inside the warm-up), success-rate
/// ejection from 3 hosts and 50 calls (A50's minimum of 5 hosts would never eject among 3),
/// and failure-percentage ejection on, also from 3 hosts.
fn s6_outlier_detection() -> OutlierDetection {
    OutlierDetection::default()
        .interval(Duration::from_millis(500))
        .success_rate(Some(
            SuccessRateEjection::default()
                .minimum_hosts(3)
                .request_volume(50),
        ))
        .failure_percentage(Some(FailurePercentageEjection::default().minimum_hosts(3)))
}

/// Connects in `mode`, drives the load, closes.
async fn run_mode(
    scenario: &Scenario,
    mode: Mode,
    settings: &Settings,
    tls: Option<&BenchTls>,
    servers: &mut [ServerProc],
) -> Result<RunResult, BoxError> {
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    match mode {
        Mode::Channel => {
            let channel = endpoint(addrs[0], tls)?.connect().await?;
            drive(EchoClient::new(channel), scenario, settings, servers).await
        }
        Mode::Balance(n) => {
            let (channel, changes) = Channel::balance_channel::<usize>(addrs.len() * n);
            for (key, addr) in addrs
                .iter()
                .flat_map(|a| std::iter::repeat_n(a, n))
                .enumerate()
            {
                changes
                    .send(Change::Insert(key, endpoint(*addr, tls)?))
                    .await?;
            }
            // balance_channel connects in the background while it is polled: the warm-up
            // makes sure every endpoint is connected before the measurement.
            let result = drive(EchoClient::new(channel), scenario, settings, servers).await;
            drop(changes);
            result
        }
        Mode::Pool(_) | Mode::PoolWith(_) | Mode::PoolOutlier(_) => {
            let (n, balance) = match mode {
                Mode::PoolWith(balance) | Mode::PoolOutlier(balance) => (1, balance),
                Mode::Pool(n) => (n, Balance::RoundRobin),
                _ => unreachable!("matched above"),
            };
            let target = static_target(&addrs);
            let mut builder = pool_builder(target, tls)?
                .connections_per_endpoint(n)
                .balance(balance);
            if let Mode::PoolOutlier(_) = mode {
                builder = builder.outlier_detection(s6_outlier_detection());
            }
            let pool = builder.build()?;
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
        #[cfg(feature = "metrics")]
        Mode::PoolMetrics(n) => {
            // On for this pool's whole life: its handles are registered while it is built
            // and at its first calls (the warm-up); off again before the next mode's pool.
            crate::recorder::set(true);
            let result = Box::pin(run_mode(scenario, Mode::Pool(n), settings, tls, servers)).await;
            crate::recorder::set(false);
            // A recorder that dropped the samples would measure nothing: make sure it got them.
            result.and_then(|r| crate::recorder::check().map(|()| r).map_err(Into::into))
        }
        #[cfg(not(feature = "metrics"))]
        Mode::PoolMetrics(_) => Err("pool+metrics needs --features metrics".into()),
        Mode::PoolGrow(max) => {
            let target = static_target(&addrs);
            let pool = pool_builder(target, tls)?
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

/// A tonic endpoint for `addr`: plaintext, or TLS trusting the scenario's certificate and
/// verifying [`TLS_NAME`].
fn endpoint(addr: SocketAddr, tls: Option<&BenchTls>) -> Result<Endpoint, BoxError> {
    let Some(tls) = tls else {
        return Ok(Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(SETUP_TIMEOUT));
    };
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.cert_pem))
        .domain_name(TLS_NAME);
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .connect_timeout(SETUP_TIMEOUT)
        .tls_config(config)?)
}

/// A pool builder for `target`: plaintext, or TLS as [`endpoint`] (the `tls` feature).
fn pool_builder(
    target: String,
    tls: Option<&BenchTls>,
) -> Result<tonic_pool::PoolBuilder, BoxError> {
    let builder = Pool::builder(target);
    match tls {
        None => Ok(builder),
        #[cfg(feature = "tls")]
        Some(tls) => Ok(builder.tls(
            tonic_pool::tls::TlsConfig::new()
                .feature_roots(false)
                .ca_certificate(&tls.cert_pem)
                .server_name(TLS_NAME),
        )),
        #[cfg(not(feature = "tls"))]
        Some(_) => Err("a TLS scenario needs the `tls` feature".into()),
    }
}

/// `static:///a,b,…` for the servers' addresses.
fn static_target(addrs: &[SocketAddr]) -> String {
    let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    format!("static:///{}", list.join(","))
}

/// Runs the closed loop: `concurrency` tasks, warm-up, then the measured window.
pub(crate) async fn drive<T>(
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
        failed: errors.values().sum::<u64>() as f64 / calls.max(1) as f64,
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
