//! S7 (feature `health`): three servers with gRPC's health service; one turns NOT_SERVING in
//! the middle of the measured window while 64 callers keep the pool busy. The pool watches
//! each server's health (`PoolBuilder::health_check("")`, gRFC A17).
//!
//! Goal: no call fails, and no call starts on the server more than 100 ms after its flip.
//! Both times come from that server's own clock: the flip is when its health service changed
//! its status, the last call is when its last `Unary` call started (see `server.rs`). The
//! other two servers carry the load before and after; the flipped server is set SERVING again
//! after each round.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use tonic_pool::Pool;

use crate::common::echo::echo_client::EchoClient;
use crate::drive::drive;
use crate::report::fmt_errors;
use crate::server::ServerProc;
use crate::{BoxError, Mode, Scenario, Settings};

/// Bound on every setup wait (connections Ready).
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The goal: no call starts on the flipped server later than this after its flip.
const GOAL: Duration = Duration::from_millis(100);

/// What one round of S7 saw.
#[derive(Debug)]
struct Round {
    ok: f64,
    errors: String,
    failed: u64,
    /// Calls the flipped server started after its flip.
    after_flip: u64,
    /// From the flip to the last call the flipped server started, when that came after it.
    last_after_flip: Option<Duration>,
}

/// Runs S7 for `settings.rounds` rounds and prints one line per round and the verdict.
pub(crate) fn run(rt: &tokio::runtime::Runtime, settings: &Settings) -> Result<(), BoxError> {
    let scenario = Scenario {
        id: "S7",
        servers: &[2, 3, 4],
        concurrency: 64,
        sleep_ms: 1,
        slow_ms: 0,
        failing_last: false,
        max_concurrent_streams: None,
        tls: false,
        modes: vec![Mode::Pool(1)],
    };
    let mut servers = scenario
        .servers
        .iter()
        .map(|&last| ServerProc::spawn_with_health(Ipv4Addr::new(127, 0, 0, last)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rounds = Vec::new();
    for round in 0..settings.rounds {
        let result = rt.block_on(run_round(&scenario, settings, &mut servers))?;
        eprintln!(
            "[S7 round {}/{}] {:.0} req/s, errors {}, flipped server: {} call(s) started after \
             its flip, the last {}",
            round + 1,
            settings.rounds,
            result.ok,
            result.errors,
            result.after_flip,
            fmt_delay(result.last_after_flip),
        );
        rounds.push(result);
    }
    let failed: u64 = rounds.iter().map(|r| r.failed).sum();
    let worst = rounds.iter().filter_map(|r| r.last_after_flip).max();
    println!();
    println!(
        "S7 NOT_SERVING under load ({} round(s) × {:.1} s, flip at mid-window, C = 64, 1 ms \
         server sleep, pool ×1 per address with health_check(\"\")):",
        settings.rounds,
        settings.measure.as_secs_f64()
    );
    println!(
        "- failed calls: {failed} (goal 0) — {}",
        if failed == 0 { "met" } else { "NOT met" }
    );
    println!(
        "- latest call start on the flipped server after its flip, worst round: {} (goal ≤ {} ms) — {}",
        fmt_delay(worst),
        GOAL.as_millis(),
        if worst.is_none_or(|w| w <= GOAL) { "met" } else { "NOT met" }
    );
    Ok(())
}

fn fmt_delay(delay: Option<Duration>) -> String {
    match delay {
        Some(d) => format!("{:.2} ms after it", d.as_secs_f64() * 1000.0),
        None => "before it (none after)".to_owned(),
    }
}

async fn run_round(
    scenario: &Scenario,
    settings: &Settings,
    servers: &mut [ServerProc],
) -> Result<Round, BoxError> {
    let list: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
    let pool = Pool::builder(format!("static:///{}", list.join(",")))
        .health_check("")
        .build()?;
    if !pool
        .wait_until(SETUP_TIMEOUT, |s| s.ready_connections() == servers.len())
        .await
    {
        return Err(format!("S7: connections not Ready: {:?}", pool.snapshot()).into());
    }
    let (steady, flipped) = servers.split_at_mut(2);
    let flipped = &mut flipped[0];
    // The flip in the middle of the measured window (drive's window starts after the warm-up,
    // counted from now, as here).
    let flip_at = Instant::now() + settings.warmup + settings.measure / 2;
    let flip = async {
        tokio::time::sleep_until(flip_at.into()).await;
        flipped.set_health("NOT_SERVING")
    };
    let (result, flip) = tokio::join!(
        drive(EchoClient::new(pool.clone()), scenario, settings, steady),
        flip
    );
    let (result, (flip_time, at_flip)) = (result?, flip?);
    let (last_call, requests) = flipped.last_call()?;
    flipped.set_health("SERVING")?;
    pool.close().await?;
    let failed = result.errors.values().sum();
    Ok(Round {
        ok: result.rps,
        errors: fmt_errors(&result.errors),
        failed,
        after_flip: requests.saturating_sub(at_flip),
        last_after_flip: (last_call > flip_time)
            .then(|| Duration::from_micros(last_call - flip_time)),
    })
}
