//! Something to point `tonic-pool-tune` at: four echo servers behind a local L4 load balancer
//! that spreads connections round robin, as a cloud SLB does.
//!
//! ```text
//! cargo run --example tune_demo
//! ```
//!
//! Each backend (127.0.0.2 to 127.0.0.5) allows 8 streams per connection, answers after
//! 50 ms and names itself in an `x-backend` response header; the balancer listens on
//! 127.0.0.1. The demo prints the tuner command to run against it, then serves for
//! `TUNE_DEMO_SECS` seconds (default 300) or until Ctrl-C.

#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)] // each example uses a part of the tests' support
mod support;

use std::time::Duration;

use prost::Message;
use support::echo::EchoRequest;
use support::proxy::TestProxy;
use support::{loopback, ServerOptions, TestServer};

/// Streams each backend allows per connection.
const STREAMS_PER_CONNECTION: u32 = 8;
/// How long each call takes on the server.
const SLEEP_MS: u32 = 50;
/// Calls the suggested command keeps in flight: 8 full connections' worth.
const CONCURRENCY: usize = 64;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let backends: Vec<TestServer> = (2..=5)
        .map(|last| {
            TestServer::try_start_with(
                loopback(last),
                ServerOptions {
                    name: format!("backend-{}", last - 1),
                    name_header: Some("x-backend".to_owned()),
                    max_concurrent_streams: Some(STREAMS_PER_CONNECTION),
                    ..ServerOptions::default()
                },
            )
        })
        .collect::<Result<_, _>>()?;
    let addrs: Vec<_> = backends.iter().map(TestServer::addr).collect();
    let balancer = TestProxy::try_start_round_robin(loopback(1), &addrs)?;
    let request = EchoRequest {
        payload: Vec::new(),
        sleep_ms: SLEEP_MS,
        message: "tune".to_owned(),
    }
    .encode_to_vec();
    let hex: String = request.iter().map(|b| format!("{b:02x}")).collect();

    println!(
        "tune_demo: {} backends ({STREAMS_PER_CONNECTION} streams per connection, {SLEEP_MS} ms \
         per call) behind an L4 balancer at {}",
        backends.len(),
        balancer.addr()
    );
    println!("run:");
    println!(
        "  cargo run --release --features tune --bin tonic-pool-tune -- static:///{} \\\n    \
         --method /echo.Echo/Unary --request-hex {hex} --backend-header x-backend \\\n    \
         --concurrency {CONCURRENCY} --max-connections 32 --step-duration 2s \
         --plot tune-example.svg",
        balancer.addr()
    );

    let secs = std::env::var("TUNE_DEMO_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(secs)) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    for backend in &backends {
        println!("{}: {} calls", backend.name(), backend.requests());
    }
    Ok(())
}
