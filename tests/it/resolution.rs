//! Resolution: address sets that change under load (scale up, scale down, pod recycle), DNS
//! outages and failed answers (the last good set is kept), a target that never resolves, the
//! TTL clamp, early re-resolution on connection loss, per-address overrides for addresses that
//! appear later, and a property over any sequence of address sets.
//!
//! DNS answers come from `TestDns` (zone `test.`) on 127.0.0.1, asked through
//! `dns://127.0.0.1:PORT/svc.test:P` targets. The servers behind the name are `TestServer`s on
//! 127.0.N.2, 127.0.N.3, … sharing one port P (a DNS name carries no port); every test has its
//! own N, so tests running in parallel never compete for an address. Nothing leaves 127/8.

use crate::support;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use support::common::{builder, client, drive_load, echo, wait_all_ready, LoadReport, WAIT};
use support::dns::{Mode, TestDns};
use support::{ServerOptions, TestServer};
use tokio::sync::watch;
use tonic_pool::resolve::{BoxFuture, DnsResolver, Resolution, Resolve, ResolveError};
use tonic_pool::state::Scope;
use tonic_pool::{ConnectivityState, Pool, PoolBuilder, PoolSnapshot, Target};

/// The name every test publishes its servers under.
const NAME: &str = "svc.test";
/// The TTL of the published records, in seconds.
const TTL_SECS: u32 = 1;
/// The pool's TTL ceiling in these tests: the records' TTL.
const TTL: Duration = Duration::from_secs(TTL_SECS as u64);
/// The pool's TTL floor in these tests.
const TTL_FLOOR: Duration = Duration::from_millis(200);
/// The pool's rate limit of early re-resolution in these tests.
const MIN_RERESOLVE: Duration = Duration::from_millis(100);
/// What one resolution may add to a TTL before new servers get calls: the queries, applying
/// the answer, connecting, and the first call (measured: tens of milliseconds).
const RESOLUTION_SLACK: Duration = Duration::from_millis(500);
/// The lookup timeout of resolvers in tests where the DNS server stops answering (the default,
/// 5 s, would make every failed resolution take 5 s).
const SHORT_DNS_TIMEOUT: Duration = Duration::from_millis(300);

// === helpers ===

/// Logs per `RUST_LOG` (off by default), for diagnosing a failure.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}

/// `127.0.net.host`.
fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, net, host))
}

/// Starts `n` servers on 127.0.`net`.2, .3, … that share one port; another port is tried when
/// the first one's is taken on another address.
fn start_servers(net: u8, n: usize) -> Vec<TestServer> {
    const TRIES: usize = 20;
    for _ in 0..TRIES {
        let first = TestServer::start(SocketAddr::new(ip(net, 2), 0));
        let port = first.addr().port();
        let mut servers = vec![first];
        for i in 1..n {
            let host = 2 + u8::try_from(i).expect("few servers");
            let addr = SocketAddr::new(ip(net, host), port);
            match TestServer::try_start_with(addr, ServerOptions::default()) {
                Ok(server) => servers.push(server),
                Err(_) => break,
            }
        }
        if servers.len() == n {
            return servers;
        }
    }
    panic!(
        "no port free on all of 127.0.{net}.2..={} in {TRIES} tries",
        n + 1
    );
}

/// The IPv4 address of `addr`.
fn v4(addr: SocketAddr) -> Ipv4Addr {
    match addr.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => panic!("{ip} is not IPv4"),
    }
}

/// Publishes `servers[i]` for each `i` in `which` as the A records of [`NAME`].
fn publish(dns: &TestDns, servers: &[TestServer], which: &[usize]) {
    let ips: Vec<Ipv4Addr> = which.iter().map(|&i| v4(servers[i].addr())).collect();
    dns.set_a(NAME, &ips, TTL_SECS);
}

/// A `TestDns` and the servers behind [`NAME`], as pods behind a headless Service.
struct Cluster {
    dns: TestDns,
    servers: Vec<TestServer>,
}

impl Cluster {
    fn start(net: u8, n: usize) -> Self {
        Self {
            dns: TestDns::start(),
            servers: start_servers(net, n),
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.servers[i].addr()
    }

    /// `dns://<TestDns>/svc.test:<port>`.
    fn target(&self) -> String {
        target(&self.dns, &self.servers)
    }

    fn publish(&self, which: &[usize]) {
        publish(&self.dns, &self.servers, which);
    }

    /// A pool builder for the target: fast backoff, TTL clamped to 200 ms..=1 s, early
    /// re-resolution at most every 100 ms, and a drain long enough never to cut a call.
    fn builder(&self) -> PoolBuilder {
        builder(&self.target())
            .resolve_ttl_bounds(TTL_FLOOR, TTL)
            .min_reresolve_interval(MIN_RERESOLVE)
            .drain_timeout(WAIT)
    }

    fn requests(&self) -> Vec<u64> {
        self.servers.iter().map(TestServer::requests).collect()
    }
}

fn target(dns: &TestDns, servers: &[TestServer]) -> String {
    format!("dns://{}/{NAME}:{}", dns.addr(), servers[0].addr().port())
}

/// A resolver for `dns`'s server that gives up on a query after [`SHORT_DNS_TIMEOUT`].
fn short_timeout_resolver(dns: &TestDns) -> DnsResolver {
    DnsResolver::with_server(dns.addr()).timeout(SHORT_DNS_TIMEOUT)
}

/// A resolver that counts the resolutions the pool starts, so that a test can wait for them.
///
/// The pool applies one resolution's answer (or records its failure) before it starts the
/// next, so once resolution `n + 1` has started, the snapshot reflects the first `n`. (Waiting
/// with `pool.wait_until` on `resolve_errors` does not work: see
/// `wait_until_wakes_on_a_failed_resolution`.)
#[derive(Clone, Debug)]
struct Counted<R> {
    inner: R,
    started: Arc<watch::Sender<u64>>,
}

impl<R> Counted<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            started: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Resolutions started so far.
    fn started(&self) -> u64 {
        *self.started.borrow()
    }

    /// Waits until resolution `n` (counting from 1) is reflected in the pool's snapshot, that
    /// is until resolution `n + 1` has started; false after [`WAIT`].
    async fn wait_recorded(&self, n: u64) -> bool {
        let mut rx = self.started.subscribe();
        let started = rx.wait_for(|started| *started > n);
        let recorded = matches!(tokio::time::timeout(WAIT, started).await, Ok(Ok(_)));
        recorded
    }
}

impl<R: Resolve> Resolve for Counted<R> {
    fn resolve(&self, target: &Target) -> BoxFuture<'static, Result<Resolution, ResolveError>> {
        self.started.send_modify(|n| *n += 1);
        self.inner.resolve(target)
    }
}

/// Endpoints that are not draining, with their connection counts.
fn active(s: &PoolSnapshot) -> BTreeMap<SocketAddr, usize> {
    s.endpoints
        .iter()
        .filter(|e| !e.draining)
        .map(|e| {
            (
                e.addr.socket_addr().expect("TCP endpoints"),
                e.connections.len(),
            )
        })
        .collect()
}

/// Whether the active endpoints are exactly `expected` (address → connections), every one of
/// their connections Ready; with nothing expected, whether the pool has no active endpoint and
/// is TransientFailure.
fn settled(s: &PoolSnapshot, expected: &BTreeMap<SocketAddr, usize>) -> bool {
    let active_endpoints = s.endpoints.iter().filter(|e| !e.draining);
    active_endpoints.clone().count() == expected.len()
        && active(s) == *expected
        && active_endpoints
            .flat_map(|e| &e.connections)
            .all(|c| c.state == ConnectivityState::Ready)
        && (!expected.is_empty() || s.state == ConnectivityState::TransientFailure)
}

/// Waits until [`settled`] holds for `expected`; panics with the snapshot if it never does.
async fn wait_settled(pool: &Pool, expected: &[(SocketAddr, usize)]) {
    let expected: BTreeMap<SocketAddr, usize> = expected.iter().copied().collect();
    let ok = pool.wait_until(WAIT, |s| settled(s, &expected)).await;
    assert!(
        ok,
        "the pool never settled on {expected:?}: {:#?}",
        pool.snapshot()
    );
}

/// Asserts that a load run made calls and that none failed.
fn assert_no_failures(what: &str, report: &LoadReport) {
    let shown: Vec<&tonic::Status> = report.failed.iter().take(5).collect();
    assert!(
        report.failed.is_empty(),
        "{what}: {} of {} calls failed, first ones: {shown:?}",
        report.failed.len(),
        report.ok + report.failed.len() as u64
    );
    assert!(report.ok > 0, "{what}: no call was made");
}

/// Waits until every server in `servers` has served `more` calls beyond `since`.
async fn wait_more_requests(servers: &[&TestServer], since: &[u64], more: u64) {
    for (server, before) in servers.iter().zip(since) {
        assert!(
            server.wait_for_requests(before + more, WAIT).await,
            "{} served {} calls, expected at least {}",
            server.addr(),
            server.requests(),
            before + more
        );
    }
}

// === scaling and recycling under load ===

/// Scale-up 1 → 3 under load: both new addresses get calls within one TTL (1 s) plus one
/// resolution of the record change, no call fails, and once all three are Ready a second load
/// phase gives every server a share of the calls within 10 % of the mean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_up_under_load_reaches_new_servers_within_a_ttl() {
    let cluster = Cluster::start(11, 3);
    cluster.publish(&[0]);
    let pool = cluster
        .builder()
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    wait_all_ready(&pool, 2).await;

    let mut reached = Vec::new();
    let scenario = async {
        assert!(cluster.servers[0].wait_for_requests(50, WAIT).await);
        let changed = Instant::now();
        cluster.publish(&[0, 1, 2]);
        for server in &cluster.servers[1..] {
            assert!(
                server.wait_for_requests(1, WAIT).await,
                "{} never got a call",
                server.addr()
            );
            reached.push(changed.elapsed());
        }
    };
    let report = drive_load(&pool, 8, 2, WAIT * 2, scenario).await;
    assert_no_failures("scale-up", &report);
    assert_eq!(reached.len(), 2, "the scenario did not finish");
    println!("scale-up: new servers got their first calls {reached:?} after the record change");
    for elapsed in &reached {
        assert!(
            *elapsed <= TTL + RESOLUTION_SLACK,
            "a new server got its first call {elapsed:?} after the change (TTL {TTL:?})"
        );
    }

    // Shares once all three are Ready.
    wait_all_ready(&pool, 6).await;
    let before = cluster.requests();
    let report = drive_load(
        &pool,
        8,
        2,
        WAIT,
        tokio::time::sleep(Duration::from_millis(1500)),
    )
    .await;
    assert_no_failures("balance after scale-up", &report);
    let shares: Vec<u64> = cluster
        .requests()
        .iter()
        .zip(&before)
        .map(|(after, before)| after - before)
        .collect();
    let mean = shares.iter().sum::<u64>() as f64 / shares.len() as f64;
    println!("scale-up: second phase shares {shares:?} (mean {mean:.1})");
    assert!(mean >= 100.0, "too few calls to judge shares: {shares:?}");
    for (i, share) in shares.iter().enumerate() {
        let deviation = (*share as f64 - mean).abs() / mean;
        assert!(
            deviation <= 0.10,
            "{} served {share} calls, {:.1} % off the mean {mean:.1}: {shares:?}",
            cluster.addr(i),
            deviation * 100.0
        );
    }
    pool.close().await.unwrap();
}

/// Scale-down 3 → 2 under load (calls of 10 ms, so the removed server has calls in flight):
/// no call fails; the removed address drains — each of its connections ends as "drained", not
/// cut — its endpoint leaves the snapshot, the server sees its connections close, and it gets
/// no call afterwards while the other two keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_under_load_drains_the_removed_server() {
    let cluster = Cluster::start(12, 3);
    cluster.publish(&[0, 1, 2]);
    let pool = cluster
        .builder()
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    wait_all_ready(&pool, 6).await;
    let removed = cluster.addr(2);
    let mut events = pool.events();

    let mut timings = None;
    let mut saw_draining = false;
    let scenario = async {
        assert!(cluster.servers[2].wait_for_requests(50, WAIT).await);
        let changed = Instant::now();
        cluster.publish(&[0, 1]);
        let gone = pool
            .wait_until(WAIT, |s| match s.endpoint(removed) {
                Some(e) => {
                    saw_draining |= e.draining;
                    false
                }
                None => true,
            })
            .await;
        assert!(
            gone,
            "{removed} never left the pool: {:#?}",
            pool.snapshot()
        );
        let gone_after = changed.elapsed();
        assert!(
            cluster.servers[2].wait_for_open_connections(0, WAIT).await,
            "{removed} still has {} open connections",
            cluster.servers[2].open_connections()
        );
        let closed_after = changed.elapsed();
        // No call reaches the removed server any more; the others keep serving.
        let removed_calls = cluster.servers[2].requests();
        let before = cluster.requests();
        wait_more_requests(&[&cluster.servers[0], &cluster.servers[1]], &before, 100).await;
        assert_eq!(cluster.servers[2].requests(), removed_calls);
        timings = Some((gone_after, closed_after));
    };
    let report = drive_load(&pool, 8, 10, WAIT * 2, scenario).await;
    assert_no_failures("scale-down", &report);
    let (gone_after, closed_after) = timings.expect("the scenario finished");
    println!(
        "scale-down: {} calls; endpoint gone {gone_after:?} and server-side connections closed \
         {closed_after:?} after the record change (draining seen in a snapshot: {saw_draining})",
        report.ok
    );
    assert!(gone_after <= TTL + RESOLUTION_SLACK + Duration::from_secs(1));

    // Each of the removed address's connections ended by draining.
    let mut ends = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let Scope::Connection { addr, .. } = event.scope {
            if addr == removed && event.to == ConnectivityState::Shutdown {
                ends.push(event.reason);
            }
        }
    }
    assert_eq!(
        ends,
        ["drained", "drained"],
        "how {removed}'s connections ended"
    );
    wait_settled(&pool, &[(cluster.addr(0), 2), (cluster.addr(1), 2)]).await;
    pool.close().await.unwrap();
}

/// Pod recycle under load: the one address behind the name is replaced by a new one (the
/// harder case: the old and the new set share no address), then the old server shuts down
/// gracefully. No call fails; the new server takes the traffic within one TTL plus one
/// resolution and the old one gets no call after its connections drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_recycle_under_load_loses_no_call() {
    let mut cluster = Cluster::start(13, 2);
    cluster.publish(&[0]);
    let pool = cluster
        .builder()
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    wait_all_ready(&pool, 2).await;
    let (old, new) = (cluster.addr(0), cluster.addr(1));

    let mut new_after = None;
    let Cluster { dns, servers } = &mut cluster;
    let scenario = async {
        assert!(servers[0].wait_for_requests(50, WAIT).await);
        let changed = Instant::now();
        publish(dns, servers, &[1]);
        assert!(
            servers[1].wait_for_requests(1, WAIT).await,
            "{new} got no call"
        );
        new_after = Some(changed.elapsed());
        assert!(
            pool.wait_until(WAIT, |s| s.endpoint(old).is_none()).await,
            "{old} never left the pool"
        );
        assert!(servers[0].wait_for_open_connections(0, WAIT).await);
        // The old pod terminates.
        let old_calls = servers[0].requests();
        assert!(servers[0].graceful_stop(WAIT).await, "graceful stop");
        let before = servers[1].requests();
        assert!(servers[1].wait_for_requests(before + 100, WAIT).await);
        assert_eq!(servers[0].requests(), old_calls);
    };
    let report = drive_load(&pool, 8, 5, WAIT * 2, scenario).await;
    assert_no_failures("pod recycle", &report);
    let new_after = new_after.expect("the scenario finished");
    println!(
        "pod recycle: {} calls, the new address got its first call {new_after:?} after the change",
        report.ok
    );
    assert!(new_after <= TTL + RESOLUTION_SLACK);
    wait_settled(&pool, &[(new, 2)]).await;
    pool.close().await.unwrap();
}

// === DNS outages and failed answers ===

/// DNS server down under load (stopped; lookups time out after 300 ms): no call fails,
/// resolutions fail (counted, the last error kept) while the pool keeps both addresses Ready;
/// once the server is back, with a third address added to the records meanwhile, that address
/// gets calls within a lookup and a resolution backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_outage_under_load_keeps_the_addresses() {
    let Cluster { mut dns, servers } = Cluster::start(14, 3);
    publish(&dns, &servers, &[0, 1]);
    let resolver = Counted::new(short_timeout_resolver(&dns));
    let pool = builder(&target(&dns, &servers))
        .resolver(resolver.clone())
        .resolve_ttl_bounds(TTL_FLOOR, TTL)
        .min_reresolve_interval(MIN_RERESOLVE)
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    wait_all_ready(&pool, 4).await;
    let (a, b) = (servers[0].addr(), servers[1].addr());

    let mut outcome = None;
    let scenario = async {
        assert!(servers[0].wait_for_requests(20, WAIT).await);
        let errors = pool.snapshot().resolve_errors;
        dns.stop();
        let down = Instant::now();
        let started = resolver.started();
        let before = [servers[0].requests(), servers[1].requests()];
        // Two resolutions that started after the stop have failed.
        assert!(
            resolver.wait_recorded(started + 2).await,
            "no resolution while DNS was down"
        );
        // Calls keep flowing to both addresses while DNS is down.
        wait_more_requests(&[&servers[0], &servers[1]], &before, 50).await;
        let snapshot = pool.snapshot();
        assert!(
            snapshot.resolve_errors >= errors + 2,
            "failures not counted: {snapshot:#?}"
        );
        assert!(
            settled(&snapshot, &[(a, 2), (b, 2)].into_iter().collect()),
            "the addresses were not kept: {snapshot:#?}"
        );
        assert_eq!(snapshot.state, ConnectivityState::Ready);
        let last = snapshot.last_resolve_error.clone().unwrap_or_default();
        assert!(last.contains(NAME), "last resolve error: {last}");
        let errors_while_down = snapshot.resolve_errors - errors;
        let down_for = down.elapsed();

        // A third address while DNS is down; it is seen once DNS answers again.
        publish(&dns, &servers, &[0, 1, 2]);
        dns.restart();
        let back = Instant::now();
        assert!(
            servers[2].wait_for_requests(1, WAIT).await,
            "the address added after the outage got no call: {:#?}",
            pool.snapshot()
        );
        outcome = Some((down_for, errors_while_down, back.elapsed(), last));
    };
    let report = drive_load(&pool, 8, 2, WAIT * 3, scenario).await;
    assert_no_failures("DNS outage", &report);
    let (down_for, errors, picked_up, last) = outcome.expect("the scenario finished");
    println!(
        "DNS outage: {} calls, DNS down {down_for:?} with {errors} failed resolutions \
         (last: {last}); new address used {picked_up:?} after DNS came back",
        report.ok
    );
    // Failed resolutions back off by at most 250 ms, then one lookup brings the new set.
    assert!(
        picked_up <= SHORT_DNS_TIMEOUT + RESOLUTION_SLACK * 2,
        "took {picked_up:?}"
    );
    wait_settled(&pool, &[(a, 2), (b, 2), (servers[2].addr(), 2)]).await;
    pool.close().await.unwrap();
}

/// Breaks DNS with `break_dns` under load against servers 0 and 1, and checks that the pool
/// keeps both addresses (Ready, not draining) and every call succeeds while three resolutions
/// fail, counted, the last one naming `expected`; then repairs DNS with `repair`, publishes
/// server 0 alone, and checks that the change is applied (1 is drained).
///
/// The resolver is the one a `dns://server/…` target gets by default (with a 300 ms lookup
/// timeout when `short_timeout`), wrapped to count resolutions.
async fn keeps_last_good_set(
    net: u8,
    short_timeout: bool,
    break_dns: fn(&TestDns),
    repair: fn(&TestDns),
    expected: &str,
) {
    init_tracing();
    let cluster = Cluster::start(net, 2);
    cluster.publish(&[0, 1]);
    let dns_resolver = if short_timeout {
        short_timeout_resolver(&cluster.dns)
    } else {
        DnsResolver::with_server(cluster.dns.addr())
    };
    let resolver = Counted::new(dns_resolver);
    let pool = cluster
        .builder()
        .resolver(resolver.clone())
        .connections_per_endpoint(2)
        .build()
        .unwrap();
    wait_all_ready(&pool, 4).await;
    let (a, b) = (cluster.addr(0), cluster.addr(1));

    let mut outcome = None;
    let scenario = async {
        assert!(cluster.servers[1].wait_for_requests(20, WAIT).await);
        let errors = pool.snapshot().resolve_errors;
        break_dns(&cluster.dns);
        let broken = Instant::now();
        let started = resolver.started();
        let before = cluster.requests();
        assert!(
            resolver.wait_recorded(started + 1).await,
            "no resolution after the break"
        );
        let first_error = broken.elapsed();
        assert!(
            resolver.wait_recorded(started + 3).await,
            "fewer than 3 resolutions after the break"
        );
        // Both addresses served calls all along.
        wait_more_requests(&[&cluster.servers[0], &cluster.servers[1]], &before, 20).await;
        let snapshot = pool.snapshot();
        assert!(
            snapshot.resolve_errors >= errors + 3,
            "failures not counted: {snapshot:#?}"
        );
        assert!(
            settled(&snapshot, &[(a, 2), (b, 2)].into_iter().collect()),
            "the last good set was not kept: {snapshot:#?}"
        );
        assert_eq!(snapshot.state, ConnectivityState::Ready);
        let last = snapshot.last_resolve_error.clone().unwrap_or_default();
        assert!(
            last.contains(expected) && last.contains(NAME),
            "last resolve error {last:?} does not name {expected:?} and {NAME}"
        );

        // DNS answers again: the next change is applied.
        repair(&cluster.dns);
        cluster.publish(&[0]);
        assert!(
            pool.wait_until(WAIT, |s| s.endpoint(b).is_none()).await,
            "{b} was not removed after DNS recovered: {:#?}",
            pool.snapshot()
        );
        outcome = Some((first_error, snapshot.resolve_errors - errors, last));
    };
    let report = drive_load(&pool, 8, 2, WAIT * 3, scenario).await;
    assert_no_failures(expected, &report);
    let (first_error, errors, last) = outcome.expect("the scenario finished");
    println!(
        "{expected}: {} calls, none failed; first failure recorded {first_error:?} after the \
         break, {errors} counted when checked; last error: {last}",
        report.ok
    );
    wait_settled(&pool, &[(a, 2)]).await;
    pool.close().await.unwrap();
}

/// NXDOMAIN (the name removed) under load: the last good set is kept, calls keep succeeding,
/// the failures are counted with the error naming NXDOMAIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_keeps_the_last_good_set() {
    keeps_last_good_set(
        15,
        false,
        |dns| dns.remove(NAME),
        |_| {}, // publish() puts the name back
        "NXDOMAIN",
    )
    .await;
}

/// SERVFAIL under load: the last good set is kept, calls keep succeeding, the failures are
/// counted with the error naming SERVFAIL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_keeps_the_last_good_set() {
    keeps_last_good_set(
        16,
        false,
        |dns| dns.set_mode(Mode::ServFail),
        |dns| dns.set_mode(Mode::Normal),
        "SERVFAIL",
    )
    .await;
}

/// An empty answer (NOERROR, no records) under load: the last good set is kept, calls keep
/// succeeding, the failures are counted with the error saying there were no addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_answer_keeps_the_last_good_set() {
    keeps_last_good_set(
        17,
        false,
        |dns| dns.set_mode(Mode::Empty),
        |dns| dns.set_mode(Mode::Normal),
        "no addresses",
    )
    .await;
}

/// A DNS server that stops answering (every query dropped; lookups time out after 300 ms)
/// under load: the last good set is kept, calls keep succeeding, the failures are counted
/// with the error saying the lookup timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_timeout_keeps_the_last_good_set() {
    keeps_last_good_set(
        18,
        true,
        |dns| dns.set_mode(Mode::Drop),
        |dns| dns.set_mode(Mode::Normal),
        "timed out",
    )
    .await;
}

/// No good answer ever (NXDOMAIN from the start): the pool goes TransientFailure with no
/// endpoint, a call fails fast with UNAVAILABLE naming the resolution error; once the record
/// appears the pool becomes Ready and calls succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_from_the_start_fails_fast_until_the_record_appears() {
    let cluster = Cluster::start(19, 1);
    let pool = cluster.builder().build().unwrap();
    let failing = pool
        .wait_until(WAIT, |s| {
            s.state == ConnectivityState::TransientFailure && s.resolve_errors >= 1
        })
        .await;
    assert!(failing, "never TransientFailure: {:#?}", pool.snapshot());
    let snapshot = pool.snapshot();
    assert!(snapshot.endpoints.is_empty(), "{snapshot:#?}");
    assert!(
        snapshot
            .last_resolve_error
            .as_deref()
            .is_some_and(|e| e.contains("NXDOMAIN")),
        "{snapshot:#?}"
    );

    let started = Instant::now();
    let call = tokio::time::timeout(WAIT, client(&pool).unary(echo("too early")))
        .await
        .expect("the call fails fast instead of waiting");
    let failed_after = started.elapsed();
    let status = call.expect_err("no address yet");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("no such host")
            && status.message().contains(NAME)
            && status.message().contains("NXDOMAIN"),
        "the status does not name the resolution error: {status:?}"
    );
    assert!(
        failed_after < Duration::from_secs(1),
        "took {failed_after:?}"
    );

    let appeared = Instant::now();
    cluster.publish(&[0]);
    pool.wait_ready(WAIT)
        .await
        .expect("Ready once the record exists");
    let ready_after = appeared.elapsed();
    client(&pool)
        .unary(echo("now"))
        .await
        .expect("call after the record appeared");
    println!(
        "NXDOMAIN from the start: call failed in {failed_after:?} with {:?}; Ready \
         {ready_after:?} after the record appeared",
        status.message()
    );
    pool.close().await.unwrap();
}

// === when the pool resolves ===

/// The records' TTL sets the next resolution, clamped to the bounds (here 300 ms..=800 ms): a
/// TTL of 0 is re-resolved at the floor (no query storm), a TTL of an hour at the ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_is_clamped_to_the_bounds() {
    let floor = Duration::from_millis(300);
    let ceiling = Duration::from_millis(800);
    let cluster = Cluster::start(20, 1);
    let ips = [v4(cluster.addr(0))];
    cluster.dns.set_a(NAME, &ips, 0);
    let pool = builder(&cluster.target())
        .resolve_ttl_bounds(floor, ceiling)
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();

    /// The times between the first queries of the next `n + 1` resolutions, each of which
    /// sends two queries (A and AAAA); a resolution under way is skipped.
    async fn intervals(dns: &TestDns, n: usize) -> Vec<Duration> {
        let sent = dns.queries();
        // Query number `sent + 1` starts a resolution if `sent` is even (pairs complete).
        let mut first_query = sent + 1 + sent % 2;
        let mut at = Vec::new();
        for _ in 0..=n {
            assert!(
                dns.wait_for_queries(first_query, WAIT).await,
                "no resolution"
            );
            at.push(Instant::now());
            first_query += 2;
        }
        at.windows(2).map(|w| w[1] - w[0]).collect()
    }

    let at_floor = intervals(&cluster.dns, 3).await;
    // The first resolution to start after this is answered with the new TTL.
    cluster.dns.set_a(NAME, &ips, 3600);
    let at_ceiling = intervals(&cluster.dns, 2).await;
    println!("TTL 0 → resolutions every {at_floor:?}; TTL 3600 → every {at_ceiling:?}");
    for interval in &at_floor {
        assert!(
            *interval >= floor.mul_f64(0.8) && *interval < ceiling,
            "TTL 0: resolutions {at_floor:?} apart, floor {floor:?}"
        );
    }
    for interval in &at_ceiling {
        assert!(
            *interval >= ceiling.mul_f64(0.8) && *interval < ceiling * 2,
            "TTL 3600: resolutions {at_ceiling:?} apart, ceiling {ceiling:?}"
        );
    }
    pool.close().await.unwrap();
}

/// Connection loss re-resolves early: with a 30 s TTL (and ceiling), stopping one of two
/// servers brings a DNS query within the 400 ms rate limit, not after 30 s; and while that
/// server's reconnects keep failing (every ≤ 250 ms, each asking again) resolutions stay at
/// most one per `min_reresolve_interval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_loss_re_resolves_before_the_ttl() {
    let min_interval = Duration::from_millis(400);
    let mut cluster = Cluster::start(21, 2);
    let ips: Vec<Ipv4Addr> = (0..2).map(|i| v4(cluster.addr(i))).collect();
    cluster.dns.set_a(NAME, &ips, 30);
    let pool = builder(&cluster.target())
        .resolve_ttl_bounds(TTL_FLOOR, Duration::from_secs(30))
        .min_reresolve_interval(min_interval)
        .build()
        .unwrap();
    wait_all_ready(&pool, 2).await;
    let queries = cluster.dns.queries();
    assert_eq!(queries, 2, "one resolution (A and AAAA) so far");

    let stopped = Instant::now();
    cluster.servers[1].stop();
    let mut at = Vec::new();
    for resolution in 0..3 {
        let first_query = queries + 1 + 2 * resolution;
        assert!(
            cluster.dns.wait_for_queries(first_query, WAIT).await,
            "no re-resolution #{} within {WAIT:?} of the connection loss: {:#?}",
            resolution + 1,
            pool.snapshot()
        );
        at.push(stopped.elapsed());
    }
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    println!(
        "connection loss: re-resolutions at {at:?} after the server stopped (TTL 30 s), gaps {gaps:?}"
    );
    assert!(
        at[0] < Duration::from_secs(2),
        "the first re-resolution took {:?}",
        at[0]
    );
    for gap in &gaps {
        assert!(
            *gap >= min_interval.mul_f64(0.8) && *gap < Duration::from_secs(2),
            "re-resolutions {gaps:?} apart, rate limit {min_interval:?}"
        );
    }
    pool.close().await.unwrap();
}

/// `connections_for(addr, 3)` for an address that is not in the first answer applies when
/// DNS adds it: it gets 3 connections (the server sees 3) while the first keeps the default 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_applies_to_an_address_that_appears_later() {
    let cluster = Cluster::start(22, 2);
    cluster.publish(&[0]);
    let (a, b) = (cluster.addr(0), cluster.addr(1));
    let pool = cluster
        .builder()
        .connections_per_endpoint(1)
        .connections_for(b, 3)
        .build()
        .unwrap();
    wait_settled(&pool, &[(a, 1)]).await;
    assert!(pool.snapshot().endpoint(b).is_none());

    cluster.publish(&[0, 1]);
    wait_settled(&pool, &[(a, 1), (b, 3)]).await;
    assert!(cluster.servers[1].wait_for_accepted(3, WAIT).await);
    assert_eq!(cluster.servers[1].accepted_connections(), 3);
    assert_eq!(cluster.servers[0].accepted_connections(), 1);
    pool.close().await.unwrap();
}

// === property: any sequence of address sets ===

/// A resolver whose answer the test sets; no TTL (the pool uses its ceiling).
#[derive(Clone, Debug, Default)]
struct ScriptedResolver(Arc<Mutex<Vec<SocketAddr>>>);

impl ScriptedResolver {
    fn set(&self, addrs: Vec<SocketAddr>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = addrs;
    }
}

impl Resolve for ScriptedResolver {
    fn resolve(&self, _target: &Target) -> BoxFuture<'static, Result<Resolution, ResolveError>> {
        let addrs = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Box::pin(std::future::ready(Ok(Resolution::new(addrs, None))))
    }
}

/// Five servers on 127.0.30.1..=5, started once for every case.
fn prop_servers() -> &'static [TestServer] {
    static SERVERS: OnceLock<Vec<TestServer>> = OnceLock::new();
    SERVERS.get_or_init(|| {
        (1..=5)
            .map(|host| TestServer::start(SocketAddr::new(ip(30, host), 0)))
            .collect()
    })
}

/// Bound of the property test's waits: short, so that shrinking a failure does not take long.
const PROP_WAIT: Duration = Duration::from_secs(3);

/// Connection ids of draining endpoints, with their call counts.
fn draining_calls(s: &PoolSnapshot) -> HashMap<u64, u64> {
    s.endpoints
        .iter()
        .filter(|e| e.draining)
        .flat_map(|e| &e.connections)
        .map(|c| (c.id, c.calls))
        .collect()
}

/// One case: applies each set of `sets` (bit i: server i) in turn through a resolver that
/// re-resolves every 20 ms, and after each checks the active endpoints, their connection
/// counts, and where calls go.
async fn apply_sets(
    per_endpoint: usize,
    overrides: &[Option<usize>],
    sets: &[u8],
) -> Result<(), TestCaseError> {
    let servers = prop_servers();
    let addrs: Vec<SocketAddr> = servers.iter().map(TestServer::addr).collect();
    let connections = |i: usize| overrides[i].unwrap_or(per_endpoint);
    let members = |mask: u8| (0..addrs.len()).filter(move |i| mask & (1 << i) != 0);

    let script = ScriptedResolver::default();
    script.set(members(sets[0]).map(|i| addrs[i]).collect());
    let resolver = Counted::new(script.clone());
    let mut pool = builder("dns:///prop.test:1")
        .resolver(resolver.clone())
        .resolve_ttl_bounds(Duration::from_millis(20), Duration::from_millis(20))
        .connections_per_endpoint(per_endpoint)
        .drain_timeout(WAIT);
    for (i, n) in overrides.iter().enumerate() {
        if let Some(n) = n {
            pool = pool.connections_for(addrs[i], *n);
        }
    }
    let pool = pool.build().expect("valid settings");
    let mut client = client(&pool);

    // The last non-empty set: an empty answer is an error and keeps it.
    let mut expected: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for (step, &mask) in sets.iter().enumerate() {
        let errors_before = pool.snapshot().resolve_errors;
        script.set(members(mask).map(|i| addrs[i]).collect());
        if mask == 0 {
            // The first resolution to start after the change answers nothing.
            let empty_answer = resolver.started() + 1;
            prop_assert!(resolver.wait_recorded(empty_answer).await);
            let errors = pool.snapshot().resolve_errors;
            prop_assert!(
                errors > errors_before,
                "step {}: the empty answer was not an error ({} errors)",
                step,
                errors
            );
        } else {
            expected = members(mask).map(|i| (addrs[i], connections(i))).collect();
        }
        let ok = pool.wait_until(PROP_WAIT, |s| settled(s, &expected)).await;
        prop_assert!(
            ok,
            "step {step} (set {mask:#07b}): never settled on {expected:?}: {:#?}",
            pool.snapshot()
        );

        if expected.is_empty() {
            // Nothing resolved yet: calls fail fast.
            let call = tokio::time::timeout(PROP_WAIT, client.unary(echo("none"))).await;
            let code = call.map(|r| r.map_err(|s| s.code()).err());
            prop_assert_eq!(code, Ok(Some(tonic::Code::Unavailable)));
            continue;
        }
        let before: Vec<u64> = servers.iter().map(TestServer::requests).collect();
        let draining_before = draining_calls(&pool.snapshot());
        let calls = 2 * expected.values().sum::<usize>();
        for i in 0..calls {
            let reply = client.unary(echo(&format!("{step}-{i}"))).await;
            prop_assert!(reply.is_ok(), "step {step}, call {i}: {:?}", reply.err());
        }
        let deltas: Vec<u64> = servers
            .iter()
            .zip(&before)
            .map(|(server, before)| server.requests() - before)
            .collect();
        for (i, delta) in deltas.iter().enumerate() {
            if expected.contains_key(&addrs[i]) {
                prop_assert!(
                    *delta > 0,
                    "step {step}: server {i} got no call: {deltas:?}"
                );
            } else {
                prop_assert_eq!(*delta, 0, "step {}: server {} is not in the set", step, i);
            }
        }
        prop_assert_eq!(deltas.iter().sum::<u64>(), calls as u64);
        // Draining connections (if any still are) took no call.
        let draining_after = draining_calls(&pool.snapshot());
        for (id, calls) in &draining_after {
            if let Some(before) = draining_before.get(id) {
                prop_assert_eq!(
                    calls,
                    before,
                    "step {}: draining connection {} took a call",
                    step,
                    id
                );
            }
        }
    }
    pool.close().await.expect("close");
    Ok(())
}

proptest! {
    // No regression files: this crate keeps none.
    #![proptest_config(ProptestConfig {
        cases: 16,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any sequence of address sets (over 5 servers, empty sets included), with any default
    /// and per-address connection counts: after each, exactly the listed addresses are active
    /// (an empty answer keeps the last good set; before any, there is none and calls fail
    /// fast), each with its configured number of Ready connections, and calls go only to
    /// listed addresses — never to a removed (draining) one.
    #[test]
    fn any_sequence_of_address_sets_is_applied_exactly(
        per_endpoint in 1usize..=2,
        overrides in proptest::collection::vec(proptest::option::of(1usize..=3), 5),
        sets in proptest::collection::vec(0u8..32, 1..8),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(apply_sets(per_endpoint, &overrides, &sets))?;
    }
}

// === defects found ===

/// A pool whose first resolution failed, once it has resolved, does not report
/// TransientFailure when its only address is replaced by another (a pod recycle): between
/// the old address draining and the new one connecting it is Connecting, and calls made then
/// wait instead of failing fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_the_only_address_after_a_failed_first_resolution_is_not_a_failure() {
    let cluster = Cluster::start(23, 2);
    let pool = cluster.builder().build().unwrap();
    assert!(
        pool.wait_until(WAIT, |s| s.state == ConnectivityState::TransientFailure)
            .await
    );
    cluster.publish(&[0]);
    pool.wait_ready(WAIT).await.unwrap();
    let mut events = pool.events();

    let (old, new) = (cluster.addr(0), cluster.addr(1));
    let scenario = async {
        assert!(cluster.servers[0].wait_for_requests(20, WAIT).await);
        cluster.publish(&[1]);
        assert!(
            pool.wait_until(WAIT, |s| s.endpoint(old).is_none()
                && s.endpoint(new)
                    .is_some_and(|e| e.state == ConnectivityState::Ready))
                .await
        );
    };
    let report = drive_load(&pool, 4, 2, WAIT, scenario).await;
    let mut pool_states = Vec::new();
    while let Ok(event) = events.try_recv() {
        if event.scope == Scope::Pool {
            pool_states.push((event.to, event.reason));
        }
    }
    println!("pool states during the replacement: {pool_states:?}");
    assert!(
        pool_states
            .iter()
            .all(|(to, _)| *to != ConnectivityState::TransientFailure),
        "the pool reported TRANSIENT_FAILURE: {pool_states:?}"
    );
    assert_no_failures("replacement after a failed first resolution", &report);
    pool.close().await.unwrap();
}

/// `close()` is not held up by a resolution that hangs: with the DNS server dropping every
/// query (the default resolver waits 5 s for an answer), `close()` returns within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_is_not_held_up_by_a_hanging_resolution() {
    let cluster = Cluster::start(24, 1);
    cluster.publish(&[0]);
    let pool = cluster.builder().build().unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    cluster.dns.set_mode(Mode::Drop);
    // The next periodic resolution (within the 1 s ceiling) is now under way and will hang.
    let queries = cluster.dns.queries();
    assert!(cluster.dns.wait_for_queries(queries + 1, WAIT).await);

    let started = Instant::now();
    tokio::time::timeout(WAIT, pool.close())
        .await
        .expect("close() finished")
        .unwrap();
    let took = started.elapsed();
    println!("close() during a hanging resolution took {took:?}");
    assert!(took < Duration::from_secs(1), "close() took {took:?}");
}

/// `wait_until` wakes when a resolution fails, as it does for the other changes a snapshot
/// shows: a condition on `resolve_errors` holds as soon as a failure is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_until_wakes_on_a_failed_resolution() {
    let cluster = Cluster::start(25, 1);
    cluster.publish(&[0]);
    let resolver = Counted::new(DnsResolver::with_server(cluster.dns.addr()));
    let pool = cluster
        .builder()
        .resolver(resolver.clone())
        .build()
        .unwrap();
    pool.wait_ready(WAIT).await.unwrap();
    cluster.dns.set_mode(Mode::ServFail);
    let woke = pool.wait_until(WAIT, |s| s.resolve_errors >= 1).await;
    let errors = pool.snapshot().resolve_errors;
    let resolutions = resolver.started();
    assert!(
        woke,
        "wait_until never saw the failures ({errors} recorded, {resolutions} resolutions)"
    );
    pool.close().await.unwrap();
}
