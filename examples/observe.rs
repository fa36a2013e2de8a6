//! What the pool shows of itself, under load through a server restart: the snapshot's table
//! every second, then the metrics in Prometheus' text format.
//!
//! ```text
//! cargo run --example observe --features metrics
//! ```
//!
//! Two echo servers on 127.0.0.2 and 127.0.0.3, two connections to each, eight callers (one
//! call in ten asks the server for an error). After two seconds server 2 stops gracefully
//! (GOAWAY), after three it comes back; the run ends after six seconds. The metrics are recorded by
//! `metrics-exporter-prometheus`, installed without its HTTP listener: an application would
//! serve `handle.render()` on its `/metrics` endpoint (or let the exporter listen).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)] // each example uses a part of the tests' support
mod support;

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use support::echo::echo_client::EchoClient;
use support::echo::EchoRequest;
use support::{loopback, TestServer};
use tokio::time::Instant;
use tonic_pool::{BackoffConfig, Pool};

const WORKERS: usize = 8;
const RUN: Duration = Duration::from_secs(6);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Before the pool: the pool registers its handles with the recorder installed then.
    // A few buckets, to keep the print short (gRFC A66 lists the ones gRPC uses).
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration".into()), &[0.001, 0.01, 0.1, 1.0])?
        .set_buckets_for_metric(
            Matcher::Suffix("message_size".into()),
            &[0.0, 1024.0, 65536.0, 1048576.0],
        )?
        .install_recorder()?;

    let mut servers: Vec<TestServer> = (2..=3).map(|i| TestServer::start(loopback(i))).collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.addr().to_string()).collect();
    let target = format!("static:///{}", addrs.join(","));
    let pool = Pool::builder(&target)
        .connections_per_endpoint(2)
        .backoff(BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(500),
            ..BackoffConfig::default()
        })
        .build()?;
    pool.wait_ready(Duration::from_secs(5)).await?;

    let stop_at = Instant::now() + RUN;
    let mut load = Vec::new();
    for w in 0..WORKERS {
        let mut client = EchoClient::new(pool.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < stop_at {
                let message = if i % 10 == 9 {
                    "status:13".to_owned() // INTERNAL, as asked
                } else {
                    format!("{w}-{i}")
                };
                let request = EchoRequest {
                    payload: vec![0; 64],
                    sleep_ms: 1,
                    message,
                };
                let _ = client.unary(request).await;
                i += 1;
            }
        }));
    }

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut second = 0;
    while Instant::now() < stop_at {
        tick.tick().await;
        second += 1;
        println!("t={:.0?}\n{}", started.elapsed(), pool.snapshot());
        match second {
            2 => {
                // tonic's graceful shutdown: a GOAWAY on each connection, calls finish.
                println!("--- stopping server {} gracefully ---\n", servers[0].addr());
                servers[0].graceful_stop(Duration::from_secs(1)).await;
            }
            3 => {
                println!("--- restarting server {} ---\n", servers[0].addr());
                servers[0].restart();
            }
            _ => {}
        }
    }
    for task in load {
        task.await?;
    }
    pool.close().await?;
    println!("after close:\n{}", pool.snapshot());

    println!("--- metrics (Prometheus text format) ---");
    print!("{}", prometheus.render());
    Ok(())
}
