//! When the pool resolves, on tokio's paused clock: the TTL clamped to its bounds, and early
//! re-resolution after connection failures rate-limited. No sockets: a resolver that records
//! when it is asked, and a connector that fails or never answers.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tonic_pool::connector::{BoxedIo, Connect, Destination};
use tonic_pool::resolve::{BoxFuture, Resolution, Resolve, ResolveError};
use tonic_pool::{BackoffConfig, Pool, Target};

/// Answers with one address and a fixed TTL, recording the (virtual) time of each query.
#[derive(Debug, Clone)]
struct RecordingResolver {
    ttl: Option<Duration>,
    asked: Arc<Mutex<Vec<Instant>>>,
}

impl RecordingResolver {
    fn new(ttl: Option<Duration>) -> Self {
        Self {
            ttl,
            asked: Arc::default(),
        }
    }

    fn times(&self) -> Vec<Instant> {
        self.asked.lock().unwrap().clone()
    }
}

impl Resolve for RecordingResolver {
    fn resolve(&self, _: &Target) -> BoxFuture<'static, Result<Resolution, ResolveError>> {
        self.asked.lock().unwrap().push(Instant::now());
        let addr: SocketAddr = "127.0.0.2:50051".parse().unwrap();
        Box::pin(std::future::ready(Ok(Resolution::new([addr], self.ttl))))
    }
}

/// Never connects: the pool stays Connecting, and only resolution moves (with a connect
/// timeout longer than the test, so no failure asks for an early re-resolution).
#[derive(Debug)]
struct Silent;

impl Connect for Silent {
    fn connect(&self, _: &Destination) -> BoxFuture<'static, io::Result<BoxedIo>> {
        Box::pin(std::future::pending())
    }
}

/// Fails every connection at once, like a refused port.
#[derive(Debug)]
struct Refusing;

impl Connect for Refusing {
    fn connect(&self, _: &Destination) -> BoxFuture<'static, io::Result<BoxedIo>> {
        Box::pin(std::future::ready(Err(io::Error::from(
            io::ErrorKind::ConnectionRefused,
        ))))
    }
}

fn gaps(times: &[Instant]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

/// A TTL below the floor is raised to it (no query storm on TTL 0 or 1).
#[tokio::test(start_paused = true)]
async fn ttl_below_the_floor_waits_for_the_floor() {
    let resolver = RecordingResolver::new(Some(Duration::from_secs(1)));
    let pool = Pool::builder("dns:///svc.test:50051")
        .resolver(resolver.clone())
        .connector(Silent)
        .connect_timeout(Duration::from_secs(3_600))
        .resolve_ttl_bounds(Duration::from_secs(5), Duration::from_secs(30))
        .build()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(4_900)).await;
    assert_eq!(
        resolver.times().len(),
        1,
        "only the first resolution before the floor"
    );
    tokio::time::sleep(Duration::from_millis(15_200)).await;
    let times = resolver.times();
    assert_eq!(times.len(), 5, "t = 0, 5, 10, 15, 20 s");
    assert!(
        gaps(&times).iter().all(|g| *g == Duration::from_secs(5)),
        "{:?}",
        gaps(&times)
    );
    drop(pool);
}

/// A TTL above the ceiling is cut to it, and an answer without TTL is trusted for the ceiling.
#[tokio::test(start_paused = true)]
async fn ttl_above_the_ceiling_and_no_ttl_wait_for_the_ceiling() {
    for ttl in [Some(Duration::from_secs(3_600)), None] {
        let resolver = RecordingResolver::new(ttl);
        let pool = Pool::builder("dns:///svc.test:50051")
            .resolver(resolver.clone())
            .connector(Silent)
            .connect_timeout(Duration::from_secs(3_600))
            .connect_timeout(Duration::from_secs(3_600))
            .resolve_ttl_bounds(Duration::from_secs(5), Duration::from_secs(30))
            .build()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(60_500)).await;
        let times = resolver.times();
        assert_eq!(times.len(), 3, "{ttl:?}: t = 0, 30, 60 s");
        assert!(gaps(&times).iter().all(|g| *g == Duration::from_secs(30)));
        drop(pool);
    }
}

/// A TTL within the bounds is honoured as is.
#[tokio::test(start_paused = true)]
async fn ttl_within_bounds_is_honoured() {
    let resolver = RecordingResolver::new(Some(Duration::from_secs(7)));
    let pool = Pool::builder("dns:///svc.test:50051")
        .resolver(resolver.clone())
        .connector(Silent)
        .connect_timeout(Duration::from_secs(3_600))
        .build()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(21_500)).await;
    assert_eq!(gaps(&resolver.times()), vec![Duration::from_secs(7); 3]);
    drop(pool);
}

/// Failing connections ask for re-resolution much sooner than the 30 s TTL, but never more
/// often than the minimum interval, however often they fail.
#[tokio::test(start_paused = true)]
async fn reresolution_on_failure_is_rate_limited() {
    let resolver = RecordingResolver::new(Some(Duration::from_secs(30)));
    let pool = Pool::builder("dns:///svc.test:50051")
        .resolver(resolver.clone())
        .connector(Refusing)
        .connections_per_endpoint(4)
        .backoff(BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(200),
            ..BackoffConfig::default()
        })
        .min_reresolve_interval(Duration::from_secs(2))
        .build()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    let times = resolver.times();
    // Four slots fail ~every 100-200 ms, each asking; the limit allows one per 2 s.
    assert_eq!(
        times.len(),
        6,
        "t = 0, 2, 4, 6, 8, 10 s: {:?}",
        gaps(&times)
    );
    assert!(
        gaps(&times).iter().all(|g| *g == Duration::from_secs(2)),
        "{:?}",
        gaps(&times)
    );
    drop(pool);
}

/// A connection attempt that never completes is cut by the connect timeout and counts as a
/// failure: the pool goes TransientFailure exactly then, not before.
#[tokio::test(start_paused = true)]
async fn silent_connect_times_out_into_transient_failure() {
    let pool = Pool::builder("static:///127.0.0.2:50051")
        .connector(Silent)
        .connect_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let started = Instant::now();
    let mut watch = pool.watch();
    assert!(
        watch
            .wait_for(
                tonic_pool::ConnectivityState::TransientFailure,
                Duration::from_secs(60)
            )
            .await
    );
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    let snapshot = pool.snapshot();
    let error = snapshot.last_error.unwrap();
    assert!(error.contains("connect timeout"), "{error}");
    pool.close().await.unwrap();
}
