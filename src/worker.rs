//! The worker: the one background task of a pool.
//!
//! It owns resolution and the slots' tasks, and decides what the endpoint set should be; the
//! registry keeps that set (each connection slot with its control handle), so it has one
//! owner:
//!
//! - it resolves the target when the pool leaves Idle, then again when the answer's TTL
//!   (clamped to the configured floor and ceiling) runs out, and early when a connection is
//!   lost — but never more often than the minimum re-resolution interval;
//! - it applies each new address set (with subsetting, the subset `subset.rs` chooses from
//!   it): slots for new addresses start connecting, addresses still listed keep their
//!   connections, removed ones drain (no new calls; calls in flight finish, bounded by the
//!   drain timeout);
//! - a failed or empty answer keeps the last good set and is retried with backoff; the pool
//!   is TransientFailure only if no good answer ever came;
//! - a pool whose addresses are pushed ([`Push`](crate::resolve::Push)) resolves nothing: each
//!   pushed set arrives as mail and is applied as an answer is, except that an empty set is
//!   taken at its word (every address drains, the pool is TransientFailure);
//! - idle mode (`idle_timeout`): once the pool has had no call for that long it goes Idle —
//!   it stops resolving and the slots close their connections — until the next call asks to
//!   connect again.
//!
//! Everything that asks it for something arrives in its one mailbox (`mailbox.rs`). It ends as
//! soon as the last [`Pool`](crate::Pool) handle is dropped (the mailbox closes) or
//! [`Pool::close`](crate::Pool::close) asks — checked first in every turn, not at the next
//! timer — and takes every slot task with it.

use std::collections::HashSet;
use std::net::SocketAddr;

use crate::addr::EndpointAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::backoff::{Backoff, FastRng};
use crate::conn::{self, Control};
use crate::connector::Connect;
use crate::connector::Destination;
use crate::endpoint::KeepAlive;
use crate::error::Error;
use crate::growth;
use crate::mailbox::{Inbox, Mail};
use crate::registry::Shared;
use crate::resolve::{Resolution, Resolve, ResolveError, Source};
use crate::state::{wait_until, ConnectivityState};
use crate::subset::Subsetting;
use crate::BoxFuture;

/// However little of the close timeout is left once the calls in flight are done, slot tasks
/// told to shut down get at least this long to end before they are aborted (a slot cuts its
/// calls after a 2 s flush).
const TASKS_STOP_AT_LEAST: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) struct Worker {
    shared: Arc<Shared>,
    connector: Arc<dyn Connect>,
    /// The resolver; `None` when the addresses are pushed (they arrive as mail) or fixed.
    resolver: Option<Arc<dyn Resolve>>,
    /// The one address of a target that is never resolved (a Unix socket).
    fixed: Option<EndpointAddr>,
    inbox: Inbox,
    tasks: JoinSet<()>,
    rng: FastRng,
    failures: Vec<Error>,
    ever_resolved: bool,
    last_resolution: Option<Instant>,
}

impl Worker {
    pub(crate) fn new(
        shared: Arc<Shared>,
        connector: Arc<dyn Connect>,
        addresses: Source,
        inbox: Inbox,
    ) -> Self {
        let (resolver, fixed) = match addresses {
            Source::Resolver(resolver) => (Some(resolver), None),
            Source::Push(push) => {
                // From now on every change of the set is posted to this worker.
                push.attach(Box::new(shared.mailbox().clone()));
                (None, None)
            }
            Source::Fixed(addr) => (None, Some(addr)),
        };
        Self {
            shared,
            connector,
            resolver,
            fixed,
            inbox,
            tasks: JoinSet::new(),
            rng: FastRng::new(FastRng::random_seed()),
            failures: Vec::new(),
            ever_resolved: false,
            last_resolution: None,
        }
    }

    pub(crate) async fn run(mut self) {
        let shared = self.shared.clone();
        let config = &shared.config;
        if !config.connect_lazily {
            shared.request_connect();
        }
        let mut connect_rx = shared.subscribe_connect();
        // The last pushed set that arrived while Idle, applied on leaving it.
        let mut pushed_while_idle = None;
        // Idle until asked to connect.
        loop {
            tokio::select! {
                biased;
                mail = self.inbox.recv() => match mail {
                    Some(Mail::Close(reply)) => return self.shutdown(Some(reply)).await,
                    // The last pool handle is gone.
                    None => return self.shutdown(None).await,
                    // Nothing to resolve or grow while Idle.
                    Some(Mail::Reresolve | Mail::Grow(_)) => {}
                    // Each set is whole: only the last one counts.
                    Some(Mail::Addresses(set)) => pushed_while_idle = Some(set),
                },
                _ = wait_until(&mut connect_rx, |requested| *requested) => break,
            }
        }
        let reply;
        shared.set_no_endpoints_state(
            ConnectivityState::Connecting,
            match (&self.resolver, &self.fixed) {
                (Some(_), _) => "resolving",
                (None, Some(_)) => "connecting",
                (None, None) => "waiting for pushed addresses",
            },
        );

        let mut resolve_backoff = Backoff::new(config.backoff.clone(), self.rng.next_u64());
        if let Some(set) = pushed_while_idle {
            self.on_push(set, &mut resolve_backoff);
        }
        // A fixed address is the whole set, once and for good.
        if let Some(addr) = self.fixed.clone() {
            self.ever_resolved = true;
            self.apply(&[addr]);
        }
        // Resolve at once (pushed addresses are not resolved); afterwards this holds when to
        // resolve next.
        let mut next_resolution = self.resolver.is_some().then(Instant::now);
        // A lookup under way. It is polled inside the select below, not awaited in a branch,
        // so that close() or the last handle's drop is seen even while a lookup hangs.
        let mut resolving: Option<BoxFuture<'static, Result<Resolution, ResolveError>>> = None;
        // Idle mode: the wait for the idle timeout, and whether the pool is Idle now.
        let mut idle_timer = self.idle_timer();
        let mut idle = false;
        // Outlier detection's interval (gRFC A50), when it is on.
        let mut outlier_ticks = config.outlier_detection.as_ref().map(|detection| {
            let mut ticks = tokio::time::interval_at(
                tokio::time::Instant::now() + detection.interval,
                detection.interval,
            );
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        loop {
            let sleep = async {
                match next_resolution {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                mail = self.inbox.recv() => match mail {
                    Some(Mail::Close(r)) => {
                        reply = Some(r);
                        break;
                    }
                    // The last pool handle is gone.
                    None => {
                        reply = None;
                        break;
                    }
                    Some(Mail::Reresolve) => {
                        if self.is_dynamic() && !idle {
                            let earliest = self.last_resolution.map_or_else(Instant::now, |t| t + config.min_reresolve_interval);
                            let at = earliest.max(Instant::now());
                            if next_resolution.is_none_or(|n| at < n) {
                                tracing::debug!(target = %shared.target, "re-resolution requested");
                                next_resolution = Some(at);
                            }
                        }
                    }
                    Some(Mail::Grow(addr)) => {
                        shared.growth.take(&addr);
                        self.grow(&addr);
                    }
                    Some(Mail::Addresses(set)) => self.on_push(set, &mut resolve_backoff),
                },
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Err(e) = joined {
                        if e.is_panic() {
                            tracing::error!(target = %shared.target, "connection task panicked");
                            self.failures.push(Error::close_failure(format!("connection task panicked: {e}")));
                        }
                    }
                }
                _ = sleep, if resolving.is_none() => {
                    if let Some(resolver) = &self.resolver {
                        self.last_resolution = Some(Instant::now());
                        resolving = Some(resolver.resolve(&shared.target));
                    }
                }
                answer = async { resolving.as_mut().expect("guarded by the branch condition").await }, if resolving.is_some() => {
                    resolving = None;
                    next_resolution = self.on_resolution(answer, &mut resolve_backoff);
                }
                _ = async { idle_timer.as_mut().expect("guarded by the branch condition").await }, if idle_timer.is_some() && !idle => {
                    tracing::info!(target = %shared.target, "no call for the idle timeout; going Idle");
                    idle = true;
                    resolving = None;
                    next_resolution = None;
                    shared.set_no_endpoints_state(ConnectivityState::Idle, "idle timeout");
                    shared.request_idle();
                }
                now = async { outlier_ticks.as_mut().expect("guarded by the branch condition").tick().await }, if outlier_ticks.is_some() => {
                    if let Some(detection) = &config.outlier_detection {
                        let rng = &mut self.rng;
                        shared.evaluate_outliers(detection, now.into_std(), &mut || (rng.next_u64() % 100) as u32);
                    }
                }
                _ = wait_until(&mut connect_rx, |requested| *requested), if idle => {
                    idle = false;
                    idle_timer = self.idle_timer();
                    shared.set_no_endpoints_state(ConnectivityState::Connecting, "resolving");
                    if self.is_dynamic() {
                        next_resolution = Some(Instant::now());
                    }
                }
            }
        }
        self.shutdown(reply).await
    }

    /// Completes once the pool has had no call for its idle timeout (idle mode), or never.
    fn idle_timer(&self) -> Option<BoxFuture<'static, ()>> {
        let timeout = self.shared.config.idle_timeout?;
        let shared = self.shared.clone();
        Some(Box::pin(async move {
            growth::idle_for(Some(timeout), || {
                (shared.calls_started(), shared.in_flight.get())
            })
            .await;
        }))
    }

    /// Whether the target is resolved again over time (literal addresses are not, and
    /// pushed ones are never resolved).
    fn is_dynamic(&self) -> bool {
        self.resolver.is_some()
            && crate::resolve::StaticResolver::literal(&self.shared.target).is_none()
    }

    /// Applies a pushed address set. A non-empty one takes the path of a resolver's answer;
    /// an empty one is the caller saying there are no servers (not a failed lookup, which
    /// keeps the last good set): every address drains and the pool is TransientFailure
    /// until an address comes.
    fn on_push(&mut self, addresses: Vec<SocketAddr>, backoff: &mut Backoff) {
        if addresses.is_empty() {
            tracing::info!(target = %self.shared.target, "every pushed address removed");
            // Before the drain, so that the pool goes straight there, not through Connecting.
            self.shared.set_no_endpoints_state(
                ConnectivityState::TransientFailure,
                "every pushed address was removed",
            );
            self.apply(&[]);
        } else {
            // Pushed pools are not dynamic: this never schedules a resolution.
            let next = self.on_resolution(Ok(Resolution::new(addresses, None)), backoff);
            debug_assert!(next.is_none());
        }
    }

    /// Applies a resolution; returns when to resolve next.
    fn on_resolution(
        &mut self,
        answer: Result<Resolution, ResolveError>,
        backoff: &mut Backoff,
    ) -> Option<Instant> {
        let shared = self.shared.clone();
        let config = &shared.config;
        let answer = answer.and_then(|r| {
            if r.addresses.is_empty() {
                Err(ResolveError::new("resolver returned no addresses"))
            } else {
                Ok(r)
            }
        });
        match answer {
            Ok(resolution) => {
                backoff.reset();
                self.ever_resolved = true;
                // A good answer ends any failure reported while there was none; while the
                // new addresses connect the pool is Connecting, not TransientFailure.
                shared.set_no_endpoints_state(ConnectivityState::Connecting, "resolved");
                shared.record_resolution(resolution.addresses.len());
                let resolved: Vec<EndpointAddr> =
                    resolution.addresses.iter().map(|&a| a.into()).collect();
                self.apply(&resolved);
                if !self.is_dynamic() {
                    return None;
                }
                let ttl = resolution
                    .ttl
                    .unwrap_or(config.resolve_ttl_ceiling)
                    .clamp(config.resolve_ttl_floor, config.resolve_ttl_ceiling);
                Some(Instant::now() + ttl)
            }
            Err(e) => {
                let reason = format!("resolution of {} failed: {e}", shared.target);
                shared.record_resolve_error(&reason);
                if self.ever_resolved {
                    tracing::warn!(target = %shared.target, error = %e, "resolution failed; keeping the last good addresses");
                } else {
                    tracing::warn!(target = %shared.target, error = %e, "resolution failed; no addresses yet");
                    shared.set_no_endpoints_state(ConnectivityState::TransientFailure, &reason);
                }
                Some(Instant::now() + backoff.next_delay())
            }
        }
    }

    /// Makes the slots match the address set (with subsetting, the subset of it). New
    /// addresses are added before removed ones drain, so that replacing the only address
    /// never leaves the pool with no endpoint.
    fn apply(&mut self, resolved: &[EndpointAddr]) {
        let shared = self.shared.clone();
        let subset = shared
            .config
            .subset
            .map(|subsetting| self.subset(&subsetting, resolved));
        let addresses = subset.as_deref().unwrap_or(resolved);
        shared.set_address_order(resolved);
        for addr in addresses {
            if shared.is_active(addr) {
                continue;
            }
            let n = shared.config.connections_for(addr);
            tracing::info!(target = %shared.target, %addr, connections = n, "address added");
            let keepalive = Arc::new(KeepAlive::new(shared.config.keep_alive_interval));
            for _ in 0..n {
                self.spawn_slot(addr.clone(), keepalive.clone(), None);
            }
        }
        // A set, so that a large address set (a headless Service of thousands of pods) is not
        // compared address by address.
        let wanted: HashSet<&EndpointAddr> = addresses.iter().collect();
        for addr in shared.active_addresses() {
            if !wanted.contains(&addr) {
                tracing::info!(target = %shared.target, %addr, "address removed; draining");
                shared.set_draining(&addr);
            }
        }
    }

    /// The subset of `resolved` to connect to, logged in one line of counts (never the
    /// hundreds of resolved addresses): at INFO when it changes, else at DEBUG.
    fn subset(&self, subsetting: &Subsetting, resolved: &[EndpointAddr]) -> Vec<EndpointAddr> {
        let subset = subsetting.choose(resolved);
        let active = self.shared.active_addresses();
        let kept = subset.iter().filter(|&addr| active.contains(addr)).count();
        let (added, removed) = (subset.len() - kept, active.len() - kept);
        let target = &self.shared.target;
        let (size, identity) = (subsetting.size, &subsetting.identity);
        if added + removed > 0 {
            tracing::info!(%target, resolved = resolved.len(), size, ?identity, chosen = subset.len(), added, removed, "subset chosen");
        } else {
            tracing::debug!(%target, resolved = resolved.len(), size, ?identity, chosen = subset.len(), "subset unchanged");
        }
        subset
    }

    /// Opens one more connection to `addr` if all of its connections are full and Ready and
    /// it is below its maximum. One at a time: the next only once this one is Ready.
    fn grow(&mut self, addr: &EndpointAddr) {
        let shared = self.shared.clone();
        let max = shared.config.max_connections_for(addr);
        let Some((settled, count)) = shared.endpoint_settled(addr) else {
            return;
        };
        if !growth::should_grow(settled, count, max) {
            return;
        }
        let keepalive = match shared.endpoint_keepalive(addr) {
            Some(k) => k,
            None => return,
        };
        tracing::info!(target = %shared.target, %addr, connections = count + 1, max, "every connection full; opening another");
        self.spawn_slot(addr.clone(), keepalive, shared.config.grown_idle_timeout);
    }

    /// Starts a slot and registers it (with its control handle) in the registry, which keeps
    /// the endpoint set; `retire_when_idle` is set for the slots that growth adds.
    fn spawn_slot(
        &mut self,
        addr: EndpointAddr,
        keepalive: Arc<KeepAlive>,
        retire_when_idle: Option<Duration>,
    ) {
        let shared = &self.shared;
        let (control, control_rx) = watch::channel(Control::Run);
        let (id, stats) = shared.add_connection(addr.clone(), &keepalive, control);
        // The name the target gives the servers, else the address itself.
        let host = match (shared.target.host(), addr.socket_addr()) {
            (Some(host), _) => host.to_owned(),
            (None, Some(tcp)) => tcp.ip().to_string(),
            // Unix targets have a host (`localhost`); a pushed Unix address has none.
            (None, None) => "localhost".to_owned(),
        };
        // Every event of a connection carries its address and slot id, inside the pool's span.
        let span = tracing::debug_span!("conn", %addr, id);
        let slot = conn::Slot {
            id,
            dst: Destination {
                addr,
                host,
                tls: shared.target.is_tls(),
                tcp: shared.config.tcp.clone(),
            },
            config: shared.config.clone(),
            events: shared.clone(),
            connect_requested: shared.subscribe_connect(),
            backoff_resets: shared.subscribe_backoff_resets(),
            stats,
            connector: self.connector.clone(),
            keepalive,
            control: control_rx,
            seed: self.rng.next_u64(),
            retire_when_idle,
        };
        self.tasks.spawn(conn::slot::run(slot).instrument(span));
    }

    /// Stops every slot, waits for their tasks, marks the pool Shutdown and answers `close()`.
    ///
    /// Slot tasks end soon once told (an idle connection at once, one with calls after the
    /// slot's flush); with thousands of them that still takes a while, and slowness is not a
    /// failure. So the wait lasts until the pool's close timeout has passed since it was shut
    /// down (`close()` spent part of it waiting for calls in flight), and at least
    /// [`TASKS_STOP_AT_LEAST`]; only tasks still running then are aborted, and reported. A
    /// `close()` therefore takes at most its close timeout plus [`TASKS_STOP_AT_LEAST`].
    async fn shutdown(mut self, reply: Option<oneshot::Sender<Vec<Error>>>) {
        let shared = self.shared.clone();
        shared.shut_down(if reply.is_some() {
            "pool closed"
        } else {
            "last pool handle dropped"
        });
        shared.control_all(Control::Shutdown);
        let now = Instant::now();
        let shut_down_at = shared.shut_down_at().unwrap_or(now);
        let deadline = (shut_down_at + shared.config.close_timeout).max(now + TASKS_STOP_AT_LEAST);
        let joined = tokio::time::timeout_at(deadline, async {
            while let Some(joined) = self.tasks.join_next().await {
                if let Err(e) = joined {
                    if e.is_panic() {
                        self.failures.push(Error::close_failure(format!(
                            "connection task panicked: {e}"
                        )));
                    }
                }
            }
        })
        .await;
        if joined.is_err() {
            self.failures.push(Error::close_failure(format!(
                "{} connection task(s) did not stop within {:?} of the pool's shutdown and were aborted",
                self.tasks.len(),
                deadline - shut_down_at
            )));
            self.tasks.abort_all();
            // Aborted tasks end at their next poll: none outlives close().
            while self.tasks.join_next().await.is_some() {}
        }
        #[cfg(feature = "metrics")]
        shared.metrics.flush();
        tracing::debug!(target = %shared.target, "worker stopped");
        if let Some(reply) = reply {
            let _ = reply.send(std::mem::take(&mut self.failures));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::Config;
    use crate::connector::TcpConnector;
    use crate::mailbox::WeakMailbox;
    use crate::target::Target;

    /// A worker whose pool has this close timeout, with no slot: the tests give it tasks.
    fn worker(close_timeout: Duration) -> (Arc<Shared>, Worker) {
        let config = Config {
            close_timeout,
            ..Config::default()
        };
        let target = Target::parse("static:///127.0.0.1:50051").expect("target");
        let (mailbox, inbox) = crate::mailbox::mailbox();
        let shared = Shared::new(
            config,
            target,
            tokio::runtime::Handle::current(),
            WeakMailbox::new(&mailbox),
        );
        let worker = Worker {
            shared: shared.clone(),
            connector: Arc::new(TcpConnector::new()),
            resolver: None,
            fixed: None,
            inbox,
            tasks: JoinSet::new(),
            rng: FastRng::new(1),
            failures: Vec::new(),
            ever_resolved: false,
            last_resolution: None,
        };
        (shared, worker)
    }

    /// Shuts the worker down as `close()` does; returns the failures it answers with.
    async fn close(worker: Worker) -> Vec<Error> {
        let (reply, answer) = oneshot::channel();
        worker.shutdown(Some(reply)).await;
        answer.await.expect("the worker answers")
    }

    /// 2 000 connection tasks that take 12 to 14 s to stop (longer than the fixed 10 s the
    /// worker used to allow) within a 30 s close timeout are all waited for: the close
    /// reports no failure and aborts none.
    #[tokio::test(start_paused = true)]
    async fn slow_connection_tasks_are_waited_for_within_the_close_timeout() {
        let (shared, mut worker) = worker(Duration::from_secs(30));
        let stopped = Arc::new(AtomicUsize::new(0));
        for i in 0..2_000 {
            let stopped = stopped.clone();
            worker.tasks.spawn(async move {
                tokio::time::sleep(Duration::from_millis(12_000 + i)).await;
                stopped.fetch_add(1, Ordering::Relaxed);
            });
        }
        let failures = close(worker).await;
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(stopped.load(Ordering::Relaxed), 2_000);
        assert_eq!(shared.state(), ConnectivityState::Shutdown);
    }

    /// A task that never stops is aborted, and reported, once the close timeout has passed
    /// since the pool was shut down — the 8 s `close()` spent waiting for calls counted — and
    /// no sooner than 5 s after the worker was asked when no close timeout is left.
    #[tokio::test(start_paused = true)]
    async fn stuck_connection_tasks_are_aborted_once_the_close_timeout_has_passed() {
        let (shared, mut worker) = worker(Duration::from_secs(20));
        let shut_down = Instant::now();
        shared.shut_down("close() called");
        tokio::time::sleep(Duration::from_secs(8)).await;
        worker.tasks.spawn(std::future::pending::<()>());
        let failures = close(worker).await;
        assert_eq!(shut_down.elapsed(), Duration::from_secs(20));
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0]
                .to_string()
                .contains("1 connection task(s) did not stop"),
            "{}",
            failures[0]
        );

        let (shared, mut worker) = worker_with_spent_timeout().await;
        let asked = Instant::now();
        worker.tasks.spawn(std::future::pending::<()>());
        assert_eq!(close(worker).await.len(), 1);
        assert_eq!(asked.elapsed(), TASKS_STOP_AT_LEAST);
        drop(shared);
    }

    /// A worker whose pool was shut down longer than its close timeout ago.
    async fn worker_with_spent_timeout() -> (Arc<Shared>, Worker) {
        let (shared, worker) = worker(Duration::from_secs(1));
        shared.shut_down("close() called");
        tokio::time::sleep(Duration::from_secs(3)).await;
        (shared, worker)
    }
}
