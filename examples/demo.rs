//! The tonic-pool demo: a pool over three real echo servers on 127.0.0.2/3/4, under load,
//! while one server dies and comes back.
//!
//! ```text
//! cargo run --example demo
//! ```
//!
//! It prints a table every half second — per server: calls it answered in that interval,
//! its open TCP connections, and the state the pool sees for it — then stops server 2,
//! restarts it, and ends with a summary. It finishes by itself in about 12 s.

#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)] // each example uses a part of the tests' support
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::echo::echo_client::EchoClient;
use support::echo::EchoRequest;
use support::{loopback, TestServer};
use tokio::time::Instant;
use tonic_pool::{BackoffConfig, ConnectivityState, Pool};

const CONNECTIONS_PER_SERVER: usize = 4;
const WORKERS: usize = 16;
const TICK: Duration = Duration::from_millis(500);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut servers: Vec<TestServer> = (2..=4).map(|i| TestServer::start(loopback(i))).collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.addr().to_string()).collect();
    let target = format!("static:///{}", addrs.join(","));
    println!("tonic-pool demo: {WORKERS} callers, {CONNECTIONS_PER_SERVER} connections to each of 3 servers");
    println!("target: {target}\n");

    let pool = Pool::builder(&target)
        .connections_per_endpoint(CONNECTIONS_PER_SERVER)
        .backoff(BackoffConfig {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(1),
            ..BackoffConfig::default()
        })
        .build()?;
    let mut events = pool.events();
    pool.wait_ready(Duration::from_secs(5)).await?;
    println!("pool is {} after start-up\n", pool.state());

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs(10);
    let mut load = Vec::new();
    for w in 0..WORKERS {
        let mut client = EchoClient::new(pool.clone());
        let (ok, failed) = (ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < stop_at {
                let request = EchoRequest {
                    payload: vec![0; 64],
                    sleep_ms: 1,
                    message: format!("{w}-{i}"),
                };
                match client.unary(request).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(status) => {
                        println!("  call failed: {:?}: {}", status.code(), status.message());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                i += 1;
            }
        }));
    }

    print_header();
    let mut last: Vec<u64> = servers.iter().map(|s| s.requests()).collect();
    let started = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.tick().await;
    let mut stopped = false;
    let mut restarted = false;
    while Instant::now() < stop_at {
        tick.tick().await;
        let t = started.elapsed().as_secs_f64();
        if !stopped && t >= 3.0 {
            servers[0].stop();
            stopped = true;
            println!("  >>> t={t:.1}s: server {} killed", servers[0].addr());
        } else if stopped && !restarted && t >= 6.0 {
            servers[0].restart();
            restarted = true;
            println!("  >>> t={t:.1}s: server {} restarted", servers[0].addr());
        }
        let snapshot = pool.snapshot();
        let mut row = format!("{t:>5.1}s  {:<18}", snapshot.state.to_string());
        for (i, server) in servers.iter().enumerate() {
            let now = server.requests();
            let delta = now - last[i];
            last[i] = now;
            let state = snapshot
                .endpoint(server.addr())
                .map(|e| e.state.to_string())
                .unwrap_or_else(|| "-".into());
            row.push_str(&format!(
                "| {delta:>6} {:>4}  {state:<18}",
                server.open_connections()
            ));
        }
        println!("{row}");
    }
    for task in load {
        task.await?;
    }

    println!("\nconnection events seen by the pool:");
    let mut transitions = 0;
    while let Ok(event) = events.try_recv() {
        if matches!(
            event.scope,
            tonic_pool::state::Scope::Endpoint(_) | tonic_pool::state::Scope::Pool
        ) {
            println!(
                "  {:?}: {} -> {} ({})",
                event.scope, event.from, event.to, event.reason
            );
        }
        transitions += 1;
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("\n{transitions} state transitions in all");
    println!("calls: {ok} succeeded, {failed} failed (failures can only be calls in flight on the killed server)");
    for server in &servers {
        println!(
            "  {}: {} calls, {} TCP connections accepted",
            server.addr(),
            server.requests(),
            server.accepted_connections()
        );
    }
    let state = pool.state();
    pool.close().await?;
    println!("pool was {state} at the end; closed cleanly");
    if state != ConnectivityState::Ready {
        return Err("pool did not recover".into());
    }
    Ok(())
}

fn print_header() {
    println!(
        "{:>6}  {:<18}| {:>6} {:>4}  {:<18}| {:>6} {:>4}  {:<18}| {:>6} {:>4}  {:<18}",
        "time",
        "pool",
        "calls",
        "conn",
        "127.0.0.2",
        "calls",
        "conn",
        "127.0.0.3",
        "calls",
        "conn",
        "127.0.0.4"
    );
}
