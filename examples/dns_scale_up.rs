//! A DNS-driven scale-up, as on Kubernetes with a headless Service: the pool resolves
//! `svc.test` through a real DNS server (in-process, on 127.0.0.1), the record grows from one
//! pod address to three, then a pod is replaced — and the pool follows, without a failed call.
//!
//! ```text
//! cargo run --example dns_scale_up
//! ```
//!
//! It finishes by itself in about 10 s.

#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)] // each example uses a part of the tests' support
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::dns::TestDns;
use support::echo::echo_client::EchoClient;
use support::echo::EchoRequest;
use support::TestServer;
use tokio::time::Instant;
use tonic_pool::Pool;

const NAME: &str = "svc.test.";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // "Pods": echo servers on distinct loopback IPs sharing one port, as pods share a port.
    let first = TestServer::start(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 0));
    let port = first.addr().port();
    let pod = |last: u8| {
        TestServer::start(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
            port,
        ))
    };
    let ip = |last: u8| Ipv4Addr::new(127, 0, 0, last);
    let mut servers = vec![first, pod(3), pod(4), pod(5)];

    let dns = TestDns::start();
    dns.set_a(NAME, &[ip(2)], 1);
    // The headless Service: every pod IP comes back from DNS; TTL 1 s here (CoreDNS uses 5 s).
    let target = format!("dns://{}/svc.test:{port}", dns.addr());
    println!("target: {target}");
    let pool = Pool::builder(&target)
        .connections_per_endpoint(2)
        .resolve_ttl_bounds(Duration::from_millis(500), Duration::from_secs(1))
        .build()?;
    pool.wait_ready(Duration::from_secs(5)).await?;

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs(9);
    let mut load = Vec::new();
    for w in 0..8 {
        let mut client = EchoClient::new(pool.clone());
        let (ok, failed) = (ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < stop_at {
                let request = EchoRequest {
                    payload: vec![],
                    sleep_ms: 1,
                    message: format!("{w}-{i}"),
                };
                match client.unary(request).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                i += 1;
            }
        }));
    }

    let started = Instant::now();
    let mut last: Vec<u64> = servers.iter().map(|s| s.requests()).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.tick().await;
    println!(
        "\n{:>5}  {:<36}  calls per pod in the last 0.5 s",
        "time", "DNS answer"
    );
    let mut answer = "127.0.0.2";
    while Instant::now() < stop_at {
        tick.tick().await;
        let t = started.elapsed().as_secs_f64();
        if t >= 2.0 && answer == "127.0.0.2" {
            answer = "127.0.0.2 127.0.0.3 127.0.0.4";
            dns.set_a(NAME, &[ip(2), ip(3), ip(4)], 1);
            println!("  >>> t={t:.1}s: scaled up to 3 pods");
        } else if t >= 5.0 && answer == "127.0.0.2 127.0.0.3 127.0.0.4" {
            answer = "127.0.0.2 127.0.0.3 127.0.0.5";
            dns.set_a(NAME, &[ip(2), ip(3), ip(5)], 1);
            println!("  >>> t={t:.1}s: pod 127.0.0.4 replaced by 127.0.0.5");
        }
        let mut row = format!("{t:>4.1}s  {answer:<36}");
        for (i, server) in servers.iter().enumerate() {
            let now = server.requests();
            row.push_str(&format!("  .{}: {:>5}", i + 2, now - last[i]));
            last[i] = now;
        }
        println!("{row}");
    }
    for task in load {
        task.await?;
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "\ncalls: {ok} succeeded, {failed} failed; DNS queries: {}",
        dns.queries()
    );
    for endpoint in pool.snapshot().endpoints {
        println!(
            "  {} {} ({} connections{})",
            endpoint.addr,
            endpoint.state,
            endpoint.connections.len(),
            if endpoint.draining { ", draining" } else { "" }
        );
    }
    pool.close().await?;
    for server in &mut servers {
        server.stop();
    }
    if failed > 0 {
        return Err(format!("{failed} calls failed").into());
    }
    Ok(())
}
