//! Growth: an endpoint opens connections beyond its own count while every one of them is full
//! at the server's `MAX_CONCURRENT_STREAMS`, and closes them again once idle.
//!
//! The pieces, and where each runs:
//!
//! - a pick that finds every connection of an endpoint full asks for growth (once per address
//!   until the worker takes it, [`GrowthRequests`]); the worker opens one connection at a time,
//!   the next only once that one is Ready (`Worker::grow`);
//! - whether another connection is coming for an address ([`room_coming`]) decides whether a
//!   call beyond a full connection waits in the pool for room — for a call to end ([`Room`])
//!   or a new connection — rather than queue inside HTTP/2, where it could never move to
//!   another connection (`call::pick::make_room`);
//! - a connection opened by growth retires after it carried no call for the grown idle
//!   timeout ([`idle_for`], in its slot).
//!
//! This module holds the rules and signals; it names nothing above it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

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
    pending: Mutex<Vec<SocketAddr>>,
}

impl GrowthRequests {
    /// Notes a request for another connection to `addr`; true if it is new (then the caller
    /// tells the worker).
    pub(crate) fn note(&self, addr: SocketAddr) -> bool {
        let mut pending = self.pending.lock();
        if pending.contains(&addr) {
            return false;
        }
        pending.push(addr);
        true
    }

    /// The worker takes the request for `addr`: later full picks ask again.
    pub(crate) fn take(&self, addr: SocketAddr) {
        self.pending.lock().retain(|a| *a != addr);
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
