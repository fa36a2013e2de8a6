//! `DnsResolver` against `TestDns`, an in-process authoritative server for the zone `test.`:
//! addresses and TTLs, every failure kind, no caching, and `dns://server/…` targets.
//!
//! Every query goes to a `TestDns` on 127.0.0.1; nothing here asks the system's DNS servers.

use crate::support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use support::dns::{Mode, TestDns};
use tonic_pool::resolve::{DnsResolver, Resolution, Resolve, ResolveError};
use tonic_pool::Target;

/// Upper bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(5);
/// The lookup timeout of the timeout tests.
const SHORT: Duration = Duration::from_millis(300);

fn target(s: &str) -> Target {
    Target::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

async fn resolve(resolver: &DnsResolver, t: &str) -> Result<Resolution, ResolveError> {
    tokio::time::timeout(WAIT, resolver.resolve(&target(t)))
        .await
        .unwrap_or_else(|_| panic!("resolve({t}) did not finish within {WAIT:?}"))
}

async fn resolve_ok(resolver: &DnsResolver, t: &str) -> Resolution {
    resolve(resolver, t)
        .await
        .unwrap_or_else(|e| panic!("resolve({t}) failed: {e}"))
}

async fn resolve_err(resolver: &DnsResolver, t: &str) -> String {
    match resolve(resolver, t).await {
        Ok(r) => panic!("resolve({t}) succeeded with {r:?}, expected an error"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn a_records_with_their_ttl() {
    let dns = TestDns::start();
    dns.set_a("svc.test", &[v4(2), v4(3)], 5);
    let resolver = DnsResolver::with_server(dns.addr());

    let r = resolve_ok(&resolver, "dns:///svc.test:50051").await;
    assert_eq!(r.addresses, vec![sa(v4(2), 50051), sa(v4(3), 50051)]);
    assert_eq!(r.ttl, Some(Duration::from_secs(5)));
    // One A and one AAAA query: no retry, no search-list names.
    assert_eq!(dns.queries(), 2);
}

#[tokio::test]
async fn aaaa_records() {
    let dns = TestDns::start();
    dns.set_aaaa("v6.test", &[Ipv6Addr::LOCALHOST], 7);
    let resolver = DnsResolver::with_server(dns.addr());

    let r = resolve_ok(&resolver, "v6.test:8080").await;
    assert_eq!(r.addresses, vec![sa(Ipv6Addr::LOCALHOST, 8080)]);
    assert_eq!(r.ttl, Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn a_and_aaaa_ipv4_first_smallest_ttl() {
    let dns = TestDns::start();
    dns.set_a("both.test", &[v4(4)], 30);
    dns.set_aaaa("both.test", &[Ipv6Addr::LOCALHOST], 10);
    let resolver = DnsResolver::with_server(dns.addr());

    let r = resolve_ok(&resolver, "dns:///both.test:1").await;
    assert_eq!(r.addresses, vec![sa(v4(4), 1), sa(Ipv6Addr::LOCALHOST, 1)]);
    assert_eq!(r.ttl, Some(Duration::from_secs(10)));
}

#[tokio::test]
async fn fully_qualified_and_mixed_case_names() {
    let dns = TestDns::start();
    dns.set_a("fq.test", &[v4(5)], 60);
    let resolver = DnsResolver::with_server(dns.addr());

    let r = resolve_ok(&resolver, "dns:///fq.test.:9").await;
    assert_eq!(r.addresses, vec![sa(v4(5), 9)]);
    let r = resolve_ok(&resolver, "dns:///FQ.Test:9").await;
    assert_eq!(r.addresses, vec![sa(v4(5), 9)]);
}

#[tokio::test]
async fn nxdomain_is_no_such_host() {
    let dns = TestDns::start();
    let resolver = DnsResolver::with_server(dns.addr());

    let err = resolve_err(&resolver, "dns:///missing.test:1").await;
    assert!(err.contains("no such host"), "{err}");
    assert!(err.contains("missing.test"), "{err}");
    assert!(err.contains("NXDOMAIN"), "{err}");
}

#[tokio::test]
async fn removed_name_becomes_nxdomain() {
    let dns = TestDns::start();
    dns.set_a("gone.test", &[v4(6)], 60);
    let resolver = DnsResolver::with_server(dns.addr());
    resolve_ok(&resolver, "gone.test:1").await;

    dns.remove("gone.test");
    let err = resolve_err(&resolver, "gone.test:1").await;
    assert!(err.contains("no such host gone.test"), "{err}");
}

#[tokio::test]
async fn servfail_is_an_error_and_is_not_retried() {
    let dns = TestDns::start();
    dns.set_a("svc.test", &[v4(2)], 5);
    dns.set_mode(Mode::ServFail);
    let resolver = DnsResolver::with_server(dns.addr());

    let err = resolve_err(&resolver, "svc.test:1").await;
    assert!(err.contains("SERVFAIL"), "{err}");
    assert!(err.contains("svc.test"), "{err}");
    // One A and one AAAA query, each sent once.
    assert_eq!(dns.queries(), 2);

    // The server recovers: so does the next resolve (no negative caching).
    dns.set_mode(Mode::Normal);
    let r = resolve_ok(&resolver, "svc.test:1").await;
    assert_eq!(r.addresses, vec![sa(v4(2), 1)]);
}

#[tokio::test]
async fn empty_answer_is_an_error() {
    let dns = TestDns::start();
    dns.set_a("svc.test", &[v4(2)], 5);
    dns.set_mode(Mode::Empty);
    let resolver = DnsResolver::with_server(dns.addr());

    let err = resolve_err(&resolver, "svc.test:1").await;
    assert!(
        err.contains("resolver returned no addresses for host svc.test"),
        "{err}"
    );
}

#[tokio::test]
async fn name_without_address_records_is_an_error() {
    let dns = TestDns::start();
    dns.set_a("bare.test", &[], 5);
    let resolver = DnsResolver::with_server(dns.addr());

    let err = resolve_err(&resolver, "bare.test:1").await;
    assert!(err.contains("no addresses for host bare.test"), "{err}");
}

#[tokio::test]
async fn unanswered_query_times_out_within_the_timeout() {
    let dns = TestDns::start();
    dns.set_a("svc.test", &[v4(2)], 5);
    dns.set_mode(Mode::Drop);
    let resolver = DnsResolver::with_server(dns.addr()).timeout(SHORT);
    assert_eq!(resolver.lookup_timeout(), SHORT);

    let started = Instant::now();
    let err = resolve_err(&resolver, "svc.test:1").await;
    let elapsed = started.elapsed();
    assert!(err.contains("timed out"), "{err}");
    assert!(err.contains("svc.test"), "{err}");
    assert!(
        elapsed >= SHORT - Duration::from_millis(50),
        "gave up early: {elapsed:?}"
    );
    assert!(
        elapsed < SHORT + Duration::from_secs(1),
        "took {elapsed:?} for a {SHORT:?} timeout"
    );
    assert!(dns.wait_for_queries(1, WAIT).await);
}

#[tokio::test]
async fn unanswered_aaaa_still_returns_the_a_records() {
    let dns = TestDns::start();
    dns.set_a("svc.test", &[v4(2)], 5);
    dns.set_mode(Mode::DropAaaa);
    let resolver = DnsResolver::with_server(dns.addr()).timeout(SHORT);

    let started = Instant::now();
    let r = resolve_ok(&resolver, "svc.test:1").await;
    let elapsed = started.elapsed();
    assert_eq!(r.addresses, vec![sa(v4(2), 1)]);
    assert_eq!(r.ttl, Some(Duration::from_secs(5)));
    // The A answer waited for the AAAA query to time out, and no longer.
    assert!(
        elapsed < SHORT + Duration::from_secs(1),
        "took {elapsed:?} for a {SHORT:?} timeout"
    );
}

#[tokio::test]
async fn every_resolve_asks_the_server() {
    let dns = TestDns::start();
    dns.set_a("svc.test", &[v4(2)], 300);
    let resolver = DnsResolver::with_server(dns.addr());

    let first = resolve_ok(&resolver, "svc.test:1").await;
    assert_eq!(first.addresses, vec![sa(v4(2), 1)]);
    assert_eq!(dns.queries(), 2);

    // Well within the 300 s TTL, the change is seen at once.
    dns.set_a("svc.test", &[v4(3), v4(4)], 300);
    let second = resolve_ok(&resolver, "svc.test:1").await;
    assert_eq!(second.addresses, vec![sa(v4(3), 1), sa(v4(4), 1)]);
    assert_eq!(second.ttl, Some(Duration::from_secs(300)));
    assert_eq!(dns.queries(), 4);
}

#[tokio::test]
async fn dns_authority_target_asks_that_server() {
    let authority = TestDns::start();
    authority.set_a("name.test", &[v4(7)], 9);
    // The resolver's own server knows the name differently: it must not be asked.
    let default = TestDns::start();
    default.set_a("name.test", &[v4(8)], 9);
    let resolver = DnsResolver::with_server(default.addr());

    let t = format!("dns://{}/name.test:50051", authority.addr());
    let r = resolve_ok(&resolver, &t).await;
    assert_eq!(r.addresses, vec![sa(v4(7), 50051)]);
    assert_eq!(r.ttl, Some(Duration::from_secs(9)));

    // The resolver built for that server is kept and reused.
    authority.set_a("name.test", &[v4(9)], 9);
    let r = resolve_ok(&resolver, &t).await;
    assert_eq!(r.addresses, vec![sa(v4(9), 50051)]);
    assert_eq!(authority.queries(), 4);
    assert_eq!(default.queries(), 0);
    let debug = format!("{resolver:?}");
    assert!(
        debug.contains(&authority.addr().to_string()),
        "authority resolver not kept: {debug}"
    );

    // Errors name the server asked.
    let missing = format!("dns://{}/missing.test:1", authority.addr());
    let err = resolve_err(&resolver, &missing).await;
    assert!(err.contains("no such host missing.test"), "{err}");
    assert!(err.contains(&authority.addr().to_string()), "{err}");
}

#[tokio::test]
async fn literals_are_answered_without_a_query() {
    let dns = TestDns::start();
    let resolver = DnsResolver::with_server(dns.addr());

    let r = resolve_ok(&resolver, "dns:///127.0.0.9:80").await;
    assert_eq!(r.addresses, vec![sa(v4(9), 80)]);
    assert_eq!(r.ttl, None);
    let r = resolve_ok(&resolver, "static:///127.0.0.2:1,[::1]:2").await;
    assert_eq!(r.addresses, vec![sa(v4(2), 1), sa(Ipv6Addr::LOCALHOST, 2)]);
    let t = format!("dns://{}/127.0.0.3:5", dns.addr());
    let r = resolve_ok(&resolver, &t).await;
    assert_eq!(r.addresses, vec![sa(v4(3), 5)]);
    assert_eq!(dns.queries(), 0);
}

#[tokio::test]
async fn stopped_server_fails_and_restarted_server_answers() {
    let mut dns = TestDns::start();
    dns.set_a("svc.test", &[v4(2)], 5);
    let resolver = DnsResolver::with_server(dns.addr()).timeout(SHORT);
    resolve_ok(&resolver, "svc.test:1").await;

    dns.stop();
    assert!(!dns.is_running());
    let started = Instant::now();
    let err = resolve_err(&resolver, "svc.test:1").await;
    assert!(err.contains("svc.test"), "{err}");
    assert!(started.elapsed() < SHORT + Duration::from_secs(1));

    dns.restart();
    let r = resolve_ok(&resolver, "svc.test:1").await;
    assert_eq!(r.addresses, vec![sa(v4(2), 1)]);
    assert_eq!(r.ttl, Some(Duration::from_secs(5)));
}

#[tokio::test]
async fn malformed_queries_do_not_hurt_the_server() {
    let dns = TestDns::start();
    dns.set_a("svc.test", &[v4(2)], 5);
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    // Too short for a header; a header that promises a question that is not there; junk.
    for junk in [
        &[1u8, 2, 3][..],
        &[0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        &[0xff; 64],
    ] {
        socket.send_to(junk, dns.addr()).expect("send");
    }
    let resolver = DnsResolver::with_server(dns.addr());
    let r = resolve_ok(&resolver, "svc.test:1").await;
    assert_eq!(r.addresses, vec![sa(v4(2), 1)]);
}

#[tokio::test]
async fn concurrent_resolves_all_succeed() {
    let dns = TestDns::start();
    dns.set_a("svc.test", &[v4(2)], 5);
    let resolver = DnsResolver::with_server(dns.addr());
    let t = target("svc.test:1");

    let lookups: Vec<_> = (0..16).map(|_| resolver.resolve(&t)).collect();
    for lookup in lookups {
        let r = tokio::time::timeout(WAIT, lookup)
            .await
            .expect("in time")
            .expect("resolves");
        assert_eq!(r.addresses, vec![sa(v4(2), 1)]);
    }
    assert_eq!(dns.queries(), 32);
}

#[cfg(feature = "hickory-types")]
#[tokio::test]
async fn from_resolver_uses_the_given_resolver() {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use hickory_resolver::TokioResolver;

    let dns = TestDns::start();
    dns.set_a("svc.test", &[v4(2)], 5);
    let mut server = NameServerConfig::udp(dns.addr().ip());
    for connection in &mut server.connections {
        connection.port = dns.addr().port();
    }
    let config = ResolverConfig::from_parts(None, Vec::new(), vec![server]);
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    let hickory = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .expect("build resolver");
    let resolver = DnsResolver::from_resolver(hickory);

    let r = resolve_ok(&resolver, "svc.test:1").await;
    assert_eq!(r.addresses, vec![sa(v4(2), 1)]);
    assert_eq!(r.ttl, Some(Duration::from_secs(5)));
    assert!(format!("{resolver:?}").contains("custom"));
}

/// Reads `/etc/resolv.conf` only: no query is sent (the system's servers are off limits).
#[tokio::test]
async fn system_resolver_builds_and_answers_literals() {
    match DnsResolver::system() {
        Ok(resolver) => {
            let r = resolve_ok(&resolver, "dns:///127.0.0.1:1").await;
            assert_eq!(r.addresses, vec![sa(v4(1), 1)]);
        }
        // A machine without a usable resolv.conf: an error, not a panic.
        Err(err) => assert!(!err.to_string().is_empty()),
    }
}

/// Built outside any runtime, then used inside one.
#[test]
fn builds_outside_a_runtime() {
    let dns = TestDns::start();
    dns.set_a("svc.test", &[v4(2)], 5);
    let resolver = DnsResolver::with_server(dns.addr()).timeout(Duration::from_secs(2));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let r = runtime
        .block_on(resolver.resolve(&target("svc.test:1")))
        .expect("resolves");
    assert_eq!(r.addresses, vec![sa(v4(2), 1)]);
}
