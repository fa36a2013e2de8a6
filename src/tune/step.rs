//! One step of the sweep: a fresh pool of N connections per endpoint, `--concurrency` calls
//! kept in flight for `--step-duration`, and what they saw ([`Step`]).
//!
//! Every step builds its own pool, so that no connection (and no load balancer's choice of
//! backend for it) carries over from the step before. Measuring starts once every connection
//! is Ready, so connection set-up is not counted as call latency. Each caller task keeps its
//! own tally and the tallies are merged at the end: the calls share nothing but the pool.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use tokio::time::Instant;
use tonic::client::Grpc;
use tonic::metadata::AsciiMetadataKey;
use tonic::{Code, Status};

use super::codec::RawCodec;
use super::histogram::Latencies;
use super::{Options, TuneError};
use crate::{ConnectivityState, Pool, PoolSnapshot};

/// How long a step waits for its connections to be Ready.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long calls may run past the end of a step before they count as timed out.
const CALL_GRACE_MIN: Duration = Duration::from_secs(2);
/// How long closing a step's pool may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The most calls one step starts: with its duration, what bounds a step against a very
/// fast server (the step then ends early; req/s is still calls over the time they took).
const MAX_CALLS_PER_STEP: u64 = 2_000_000;
/// The most distinct backend names a step keeps; more are counted under one name.
const MAX_BACKENDS: usize = 1024;
/// The name calls past [`MAX_BACKENDS`] are counted under.
const OTHER_BACKENDS: &str = "(others)";

/// What one step measured.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Step {
    /// N: the pool's `connections_per_endpoint`.
    pub connections: usize,
    /// Calls that succeeded.
    pub ok: u64,
    /// Failed calls by gRPC code name (`Unavailable`, …; `timeout` for a call cut by the tool).
    pub errors: BTreeMap<String, u64>,
    /// From the first call to the last call's end.
    pub elapsed: Duration,
    /// Latencies of the calls that succeeded.
    pub latencies: Latencies,
    /// Ready connections at the end of the step, over every endpoint.
    pub connections_open: usize,
    /// Successful calls by the value of the backend header (empty without `--backend-header`).
    pub backends: BTreeMap<String, u64>,
}

impl Step {
    /// Successful calls per second.
    pub fn req_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }

    /// The median latency of successful calls.
    pub fn p50(&self) -> Option<Duration> {
        self.latencies.quantile(0.50)
    }

    /// The 99th percentile latency of successful calls.
    pub fn p99(&self) -> Option<Duration> {
        self.latencies.quantile(0.99)
    }

    /// Failed calls.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Failed calls as a fraction of all calls (1.0 if there was none).
    pub fn error_rate(&self) -> f64 {
        let failed = self.error_count();
        let all = self.ok + failed;
        if all == 0 {
            1.0
        } else {
            failed as f64 / all as f64
        }
    }

    /// The spread of calls over `known` backends (every backend seen in any step): the
    /// fewest calls any of them took over the most; a known backend this step never reached
    /// counts as 0. `None` when no backend is known.
    pub fn balance<'a>(&self, known: impl IntoIterator<Item = &'a String>) -> Option<f64> {
        let mut fewest = u64::MAX;
        let mut most = 0;
        for name in known {
            let calls = self.backends.get(name).copied().unwrap_or(0);
            fewest = fewest.min(calls);
            most = most.max(calls);
        }
        if most == 0 {
            // No backend known, or none reached: nothing (or nothing good) to say.
            return (fewest != u64::MAX).then_some(0.0);
        }
        Some(fewest as f64 / most as f64)
    }
}

/// Codes that say the request itself is wrong: every other call would fail the same way,
/// so the sweep stops at the first.
fn is_fatal(code: Code) -> bool {
    matches!(
        code,
        Code::Unauthenticated
            | Code::PermissionDenied
            | Code::Unimplemented
            | Code::InvalidArgument
            | Code::NotFound
    )
}

/// Builds the pool for one step and waits until every connection is Ready (or fails).
async fn connect(options: &Options, connections: usize) -> Result<Pool, TuneError> {
    let pool = Pool::builder(options.target.clone())
        .connections_per_endpoint(connections)
        .close_timeout(CLOSE_TIMEOUT)
        .build()
        .map_err(|source| TuneError::InvalidTarget {
            target: options.target.clone(),
            source,
        })?;
    let settled = |s: &PoolSnapshot| {
        let active = s.endpoints.iter().filter(|e| !e.draining).count();
        let all_ready = active > 0 && s.ready_connections() >= active * connections;
        all_ready || s.state == ConnectivityState::TransientFailure
    };
    pool.wait_until(CONNECT_TIMEOUT, settled).await;
    let snapshot = pool.snapshot();
    if snapshot.state != ConnectivityState::Ready {
        let _ = pool.close().await;
        let last_error = snapshot
            .last_error
            .or(snapshot.last_resolve_error)
            .unwrap_or_else(|| format!("not Ready after {CONNECT_TIMEOUT:?}"));
        return Err(TuneError::Connect {
            target: options.target.clone(),
            last_error,
        });
    }
    Ok(pool)
}

/// What one caller task saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    errors: BTreeMap<String, u64>,
    latencies: Latencies,
    backends: BTreeMap<String, u64>,
}

impl Tally {
    fn merge_into(self, step: &mut Step) {
        step.ok += self.ok;
        step.latencies.merge(&self.latencies);
        for (code, n) in self.errors {
            *step.errors.entry(code).or_default() += n;
        }
        for (backend, n) in self.backends {
            count_backend(&mut step.backends, backend, n);
        }
    }
}

/// Counts `n` calls for `backend`, keeping at most [`MAX_BACKENDS`] names.
fn count_backend(backends: &mut BTreeMap<String, u64>, backend: String, n: u64) {
    let name = if backends.len() < MAX_BACKENDS || backends.contains_key(&backend) {
        backend
    } else {
        OTHER_BACKENDS.to_owned()
    };
    *backends.entry(name).or_default() += n;
}

/// What every caller of a step shares.
#[derive(Debug)]
struct Shared {
    path: PathAndQuery,
    request: Bytes,
    metadata: Vec<(AsciiMetadataKey, tonic::metadata::AsciiMetadataValue)>,
    backend_header: Option<AsciiMetadataKey>,
    /// No call starts after this.
    deadline: Instant,
    /// A call still running this long after the deadline is cut.
    grace: Duration,
    /// Calls that may still start, from [`MAX_CALLS_PER_STEP`] down.
    calls_left: AtomicU64,
    /// Set by a caller that saw a fatal status: the others stop.
    stop: AtomicBool,
    /// The first fatal status.
    fatal: Mutex<Option<Status>>,
}

/// One caller: calls back to back until the deadline or a fatal status.
async fn caller(mut grpc: Grpc<Pool>, shared: Arc<Shared>) -> Tally {
    let mut tally = Tally::default();
    // Bounded by the deadline (every iteration starts before it, and each call is cut
    // `grace` after it) and by the step's call budget.
    while Instant::now() < shared.deadline
        && !shared.stop.load(Ordering::Relaxed)
        && shared
            .calls_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    {
        let mut request = tonic::Request::new(shared.request.clone());
        for (key, value) in &shared.metadata {
            request.metadata_mut().insert(key.clone(), value.clone());
        }
        let started = Instant::now();
        let call = async {
            grpc.ready()
                .await
                .map_err(|err| Status::from_error(err.into()))?;
            grpc.unary(request, shared.path.clone(), RawCodec).await
        };
        match tokio::time::timeout_at(shared.deadline + shared.grace, call).await {
            Ok(Ok(response)) => {
                tally.latencies.record(started.elapsed());
                tally.ok += 1;
                let backend = shared.backend_header.as_ref().and_then(|header| {
                    response
                        .metadata()
                        .get(header)
                        .and_then(|value| value.to_str().ok())
                });
                if let Some(backend) = backend {
                    if let Some(n) = tally.backends.get_mut(backend) {
                        *n += 1;
                    } else {
                        count_backend(&mut tally.backends, backend.to_owned(), 1);
                    }
                }
            }
            Ok(Err(status)) => {
                *tally
                    .errors
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1;
                if is_fatal(status.code()) {
                    shared.stop.store(true, Ordering::Relaxed);
                    let mut fatal = shared.fatal.lock().unwrap_or_else(PoisonError::into_inner);
                    fatal.get_or_insert(status);
                }
            }
            Err(_) => *tally.errors.entry("timeout".to_owned()).or_default() += 1,
        }
    }
    tally
}

/// Runs one step with N = `connections`.
pub(super) async fn measure(options: &Options, connections: usize) -> Result<Step, TuneError> {
    let pool = connect(options, connections).await?;
    let path =
        PathAndQuery::try_from(options.method.as_str()).map_err(|_| TuneError::CallFailed {
            status: Status::invalid_argument(format!("bad method path {:?}", options.method)),
        })?;
    let started = Instant::now();
    let shared = Arc::new(Shared {
        path,
        request: options.request.clone(),
        metadata: options.metadata.clone(),
        backend_header: options.backend_header.clone(),
        deadline: started + options.step_duration,
        grace: options.step_duration.max(CALL_GRACE_MIN),
        calls_left: AtomicU64::new(MAX_CALLS_PER_STEP),
        stop: AtomicBool::new(false),
        fatal: Mutex::new(None),
    });
    let grpc = Grpc::new(pool.clone());
    let callers: Vec<_> = (0..options.concurrency)
        .map(|_| tokio::spawn(caller(grpc.clone(), Arc::clone(&shared))))
        .collect();
    let mut step = Step {
        connections,
        ..Step::default()
    };
    for caller in callers {
        // A caller cannot panic short of a bug; its calls are then simply not counted.
        if let Ok(tally) = caller.await {
            tally.merge_into(&mut step);
        }
    }
    step.elapsed = started.elapsed();
    step.connections_open = pool.snapshot().ready_connections();
    let _ = pool.close().await;

    let fatal = shared
        .fatal
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(status) = fatal {
        return Err(TuneError::from_status(status, &options.method));
    }
    if step.ok == 0 {
        let (code, count) = step
            .errors
            .iter()
            .max_by_key(|(_, count)| **count)
            .map(|(code, count)| (code.clone(), *count))
            .unwrap_or_else(|| ("none".to_owned(), 0));
        return Err(TuneError::CallFailed {
            status: Status::unavailable(format!(
                "no call succeeded with {connections} connection(s) per endpoint \
                 ({count} failed with {code})"
            )),
        });
    }
    Ok(step)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The balance is the fewest calls over the most, over every known backend: one never
    /// reached this step makes it 0; no known backend makes it unknown.
    #[test]
    fn balance_over_known_backends() {
        let step = Step {
            backends: [("a".to_owned(), 90), ("b".to_owned(), 100)].into(),
            ..Step::default()
        };
        let known: Vec<String> = vec!["a".into(), "b".into()];
        assert_eq!(step.balance(&known), Some(0.9));
        let more: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        assert_eq!(step.balance(&more), Some(0.0));
        assert_eq!(step.balance(&[]), None);
    }

    /// A step keeps at most `MAX_BACKENDS` names; the rest are counted together.
    #[test]
    fn backend_names_are_bounded() {
        let mut backends = BTreeMap::new();
        for i in 0..MAX_BACKENDS + 10 {
            count_backend(&mut backends, format!("b{i}"), 1);
        }
        assert_eq!(backends.len(), MAX_BACKENDS + 1);
        assert_eq!(backends[OTHER_BACKENDS], 10);
    }
}
