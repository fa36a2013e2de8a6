//! Growth: an endpoint opens connections beyond its own count while every one of them is full
//! at the server's `MAX_CONCURRENT_STREAMS`, and closes them again once idle.
//!
//! The pieces, and where each runs:
//!
//! - a pick that finds every connection of an endpoint full asks for growth (once per address
//!   until the worker takes it, [`GrowthRequests`]); the worker opens one connection at a time,
//!   the next only once that one is Ready ([`should_grow`], applied by `Worker::grow`);
//! - whether another connection is coming for an address ([`room_coming`]) decides whether a
//!   call beyond a full connection waits in the pool for room — for a call to end ([`Room`])
//!   or a new connection — rather than queue inside HTTP/2, where it could never move to
//!   another connection ([`make_room`], given the pool by the call path through
//!   [`RoomSource`]);
//! - a connection opened by growth retires after it carried no call for the grown idle
//!   timeout ([`idle_for`], in its slot).
//!
//! This module holds the rules and signals; it names nothing above it.

use crate::addr::EndpointAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use tokio::time::Instant;

use crate::error::Error;
use crate::state::ConnectivityState;

/// "A call ended somewhere": what a call waits for when every connection of its endpoint is
/// full but the endpoint can still grow (see `call.rs`). One waiter is woken per ended call,
/// and only when someone waits, so calls that never wait pay one atomic load.
#[derive(Debug, Default)]
pub(crate) struct Room {
    waiters: AtomicUsize,
    freed: Notify,
}

impl Room {
    /// A call ended: wake one waiter, if any.
    #[inline]
    pub(crate) fn freed(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.freed.notify_one();
        }
    }

    /// A future that completes once a call ends after this call (or when a wake-up was left
    /// for a waiter that had gone). It is registered at once, not at its first poll, so that a
    /// call ending between here and the `await` is not missed. Only slow paths wait, so the
    /// one allocation (to pin the registration) is not on the common path.
    pub(crate) fn waiter(&self) -> impl std::future::Future<Output = ()> + Send + '_ {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let mut notified = Box::pin(self.freed.notified());
        notified.as_mut().enable();
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let waiting = Waiting(&self.waiters);
        async move {
            let _waiting = waiting;
            notified.await;
        }
    }
}

/// Endpoints whose connections were all full when a call picked one of theirs, not yet
/// handled by the worker. An address is asked for once until the worker takes it, so a burst
/// of full picks costs one lock each and one message in all.
#[derive(Debug, Default)]
pub(crate) struct GrowthRequests {
    pending: Mutex<Vec<EndpointAddr>>,
}

impl GrowthRequests {
    /// Notes a request for another connection to `addr`; true if it is new (then the caller
    /// tells the worker).
    pub(crate) fn note(&self, addr: &EndpointAddr) -> bool {
        let mut pending = self.pending.lock();
        if pending.contains(addr) {
            return false;
        }
        pending.push(addr.clone());
        true
    }

    /// The worker takes the request for `addr`: later full picks ask again.
    pub(crate) fn take(&self, addr: &EndpointAddr) {
        self.pending.lock().retain(|a| a != addr);
    }
}

/// Whether an endpoint is about to get another Ready connection, from the states of its
/// connections (`failed`: failed since it was last Ready) and its maximum: one is connecting
/// for the first time since it last failed (if ever), or it is below its maximum with every
/// connection Ready, so that the worker will open one. A connection in backoff means no.
pub(crate) fn room_coming(
    connections: impl Iterator<Item = (ConnectivityState, bool)> + Clone,
    max: usize,
) -> bool {
    let healthy = |(state, failed): (ConnectivityState, bool)| {
        !failed
            && matches!(
                state,
                ConnectivityState::Ready | ConnectivityState::Connecting
            )
    };
    connections.clone().all(healthy)
        && (connections.clone().count() < max
            || connections
                .into_iter()
                .any(|(state, _)| state == ConnectivityState::Connecting))
}

/// A call's place on a connection, as waiting for room sees it.
pub(crate) trait Place: Send {
    /// The address of the connection.
    fn addr(&self) -> EndpointAddr;
    /// Whether the call came after the server's stream limit on its connection was taken.
    fn is_beyond_stream_limit(&self) -> bool;
    /// Gives the place back without sending: the call will pick again.
    fn requeue(self);
}

/// What waiting for room needs from the pool: its changes, the ended-call signal, a pick, and
/// the growth rules for an address.
pub(crate) trait RoomSource: Sync {
    /// A call's place.
    type Place: Place;
    /// Changes of any state (a connection Ready, one gone), marked seen on subscription.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Calls ending.
    fn room(&self) -> &Room;
    /// Picks a connection (waiting for one as the call's wait-for-ready says).
    fn pick(&self) -> impl std::future::Future<Output = Result<Self::Place, Error>> + Send;
    /// Whether another Ready connection is coming for `addr` ([`room_coming`]).
    fn room_coming(&self, addr: &EndpointAddr) -> bool;
    /// Asks for another connection to `addr`.
    fn request_growth(&self, addr: &EndpointAddr);
}

/// The longest a call waits in the pool for room before it queues on a full connection.
const MAX_ROOM_WAIT: Duration = Duration::from_secs(1);

/// When the call's connection is full at the server's stream limit and its endpoint can
/// still grow, the call waits in the pool — for a call to end anywhere or for a new
/// connection to be Ready — and picks again, instead of queueing in HTTP/2 behind the
/// streams of that one connection (which, for long calls, can take as long as they do).
/// Bounded: after [`MAX_ROOM_WAIT`] (and within the call's deadline), or as soon as no new
/// connection is coming (at its maximum and all Ready, or one failed), the call takes one
/// last pick and goes where it lands; if that connection is full too, HTTP/2 queues it.
///
/// Each round subscribes to both signals *before* it picks again: a connection that comes up
/// or a call that ends before the subscription is seen by the pick, one after it wakes the
/// wait, so no wake-up falls between the two.
pub(crate) async fn make_room<S: RoomSource>(
    source: &S,
    guard: S::Place,
) -> Result<S::Place, Error> {
    if !guard.is_beyond_stream_limit() {
        return Ok(guard);
    }
    let give_up = Instant::now() + MAX_ROOM_WAIT;
    // The place held from the last pick, given back only once the signals are subscribed.
    let mut held = Some(guard);
    loop {
        let mut version = source.changes();
        version.borrow_and_update();
        let room = source.room().waiter();
        if let Some(beyond) = held.take() {
            beyond.requeue();
        }
        let guard = source.pick().await?;
        let addr = guard.addr();
        if !guard.is_beyond_stream_limit() || Instant::now() >= give_up {
            return Ok(guard);
        }
        if !source.room_coming(&addr) {
            // No connection is coming. But the pick above may predate the state that says
            // so: the last connection growth may open can have become Ready (and calls can
            // have ended) between that pick and this look. One last pick, on a picker at
            // least as new as the state just read, finds such room; if there is none,
            // HTTP/2 queues the call on a full connection.
            guard.requeue();
            return source.pick().await;
        }
        source.request_growth(&addr);
        // The place is given back for the wait: others may take it meanwhile.
        guard.requeue();
        tokio::select! {
            _ = room => {}
            _ = version.changed() => {}
            _ = tokio::time::sleep_until(give_up) => {}
        }
    }
}

/// Whether the worker opens one more connection to an endpoint: only once every connection
/// it has is Ready (one at a time) and it is below its maximum.
pub(crate) fn should_grow(settled: bool, connections: usize, max: usize) -> bool {
    settled && connections < max
}

/// Completes once a connection has carried no call for `idle` — `activity` gives its calls so
/// far and its calls in flight — checked once per `idle`, so within twice that; never without
/// an idle timeout.
pub(crate) async fn idle_for(idle: Option<Duration>, activity: impl Fn() -> (u64, usize)) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let mut seen = activity().0;
    loop {
        tokio::time::sleep(idle).await;
        let (calls, in_flight) = activity();
        if calls == seen && in_flight == 0 {
            return;
        }
        seen = calls;
    }
}
