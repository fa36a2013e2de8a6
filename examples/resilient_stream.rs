//! Keeping a server stream alive while its server restarts, with `ResilientStream`.
//!
//! ```text
//! cargo run --example resilient_stream
//! ```
//!
//! A subscriber reads a tick stream through the pool; the server is killed and restarted
//! twice; the subscriber sees a reconnect signal each time and keeps reading.

#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)] // each example uses a part of the tests' support
mod support;

use std::time::Duration;

use support::echo::echo_client::EchoClient;
use support::echo::StreamRequest;
use support::{loopback, TestServer};
use tonic_pool::stream::{ResilientStream, StreamEvent};
use tonic_pool::{BackoffConfig, Pool, WaitForReady};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut server = TestServer::start(loopback(2));
    let backoff = BackoffConfig {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
        ..BackoffConfig::default()
    };
    let pool = Pool::builder(format!("static:///{}", server.addr()))
        .backoff(backoff.clone())
        .build()?;
    pool.wait_ready(Duration::from_secs(5)).await?;

    let client = EchoClient::new(pool.clone());
    let mut ticks = ResilientStream::new(move || {
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(StreamRequest {
                count: 1_000_000,
                interval_ms: 100,
                message: "tick".into(),
            });
            // A reopen waits for a Ready connection instead of failing fast while the
            // server is down, for at most 10 s.
            request.extensions_mut().insert(WaitForReady(true));
            request.set_timeout(Duration::from_secs(10));
            client.server_stream(request).await
        }
    })
    .backoff(backoff);

    let mut restarts = 0;
    let mut messages = 0;
    while let Some(event) = ticks.next().await {
        match event? {
            StreamEvent::Message(tick) => {
                messages += 1;
                println!("tick seq={} from {}", tick.seq, tick.server);
                if tick.seq == 5 {
                    if restarts == 2 {
                        break;
                    }
                    restarts += 1;
                    println!(">>> killing the server (restart {restarts} of 2)");
                    server.stop();
                    let mut state = pool.watch();
                    state
                        .wait_for(
                            tonic_pool::ConnectivityState::TransientFailure,
                            Duration::from_secs(5),
                        )
                        .await;
                    println!(">>> pool is {}; restarting the server", pool.state());
                    server.restart();
                }
            }
            StreamEvent::Reconnected { reconnects, cause } => {
                println!(
                    ">>> stream reopened (#{reconnects}) after: {}",
                    cause.message()
                );
            }
            _ => {}
        }
    }
    println!(
        "{messages} ticks read across {} reconnects",
        ticks.reconnects()
    );
    drop(ticks);
    pool.close().await?;
    Ok(())
}
