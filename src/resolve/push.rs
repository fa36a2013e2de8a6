//! Push discovery: the caller tells the pool its addresses, instead of the pool resolving them.
//!
//! For callers that already have a discovery stream — a Kubernetes EndpointSlice watch, a
//! Consul blocking query, xDS EDS, or a `Stream` of `tower::discover::Change`s as tonic's
//! `Channel::balance_channel` takes — a [`Push`] handle is the pool's address set:
//!
//! ```no_run
//! use tonic_pool::{resolve::Push, Pool};
//!
//! # fn run() -> Result<(), tonic_pool::Error> {
//! let addresses = Push::new();
//! // The target names the service (its `:authority`, the TLS host name); it is not resolved.
//! let pool = Pool::builder("billing.internal:443")
//!     .discovery(addresses.clone())
//!     .build()?;
//! addresses.insert("127.0.0.2:50051".parse().unwrap()); // connections open, then get calls
//! addresses.insert("127.0.0.3:50051".parse().unwrap());
//! addresses.remove("127.0.0.2:50051".parse().unwrap()); // drains: calls in flight finish
//! # Ok(()) }
//! ```
//!
//! Forwarding a stream of `tower::discover::Change<SocketAddr, _>`s is one `match`:
//! `Change::Insert(addr, _) => push.insert(addr)`, `Change::Remove(addr) => push.remove(addr)`.
//!
//! ## What a change does
//!
//! Every change sends the whole new set to the pool's worker, through the same mailbox as its
//! other requests, and the worker applies it exactly as it applies a resolver's answer: new
//! addresses get their connections (`connections_per_endpoint`, or `connections_for`),
//! addresses still listed keep theirs, removed ones drain — no new calls, calls in flight
//! finish, bounded by the drain timeout. The pool never resolves its target and never asks
//! for re-resolution: the pushed set is the truth until the next change.
//!
//! - **Before `build()`**: changes are kept, and the pool starts from the set as it is when
//!   built. A pool whose handle was never given an address is Connecting until one comes.
//! - **An empty set** (the last address removed, or `replace([])`) is the caller saying there
//!   are no servers, not a failed lookup: every address drains and the pool is
//!   TransientFailure — calls fail fast with UNAVAILABLE, or wait for an address with
//!   wait-for-ready — until an address is added. (An empty DNS answer, by contrast, is taken
//!   for a broken lookup: the pool keeps the last good set.)
//! - **A server that goes away** without being removed keeps its place: its connections
//!   back off and reconnect as any do (calls go to the other addresses meanwhile), since the
//!   pool has nothing to ask for a fresh set. Remove it when your discovery says it is gone.
//! - **Dropping every handle** changes nothing: the pool keeps the last set for its life.
//! - **One handle, several pools**: each pool given a clone follows the same set.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;

/// Where a pool that follows a [`Push`] takes its sets: its worker's mailbox, which
/// implements this (the worker is a layer above; it is told through a trait defined here).
pub(crate) trait AddressSink: fmt::Debug + Send + Sync + 'static {
    /// Hands the pool the whole new set; false when the pool is gone.
    fn send(&self, addresses: Vec<SocketAddr>) -> bool;
}

/// A pool's address set, pushed by the caller; see the [module docs](self).
///
/// Cheap to clone: clones share the set. Changes reach every pool built with
/// [`PoolBuilder::discovery`](crate::PoolBuilder::discovery) and this handle (or a clone).
#[derive(Clone, Debug, Default)]
pub struct Push {
    inner: Arc<Mutex<Pushed>>,
}

#[derive(Debug, Default)]
struct Pushed {
    /// The set, in the order addresses were added.
    addresses: Vec<SocketAddr>,
    /// Whether any change was made (an explicitly emptied set differs from a new one).
    changed: bool,
    /// The workers of the pools that follow this set; weak, so that a handle never keeps a
    /// pool alive. Closed ones are dropped at the next change.
    pools: Vec<Box<dyn AddressSink>>,
}

impl Pushed {
    /// Sends the set to every pool still there.
    fn publish(&mut self) {
        self.changed = true;
        let addresses = &self.addresses;
        self.pools.retain(|pool| pool.send(addresses.clone()));
    }
}

impl Push {
    /// An empty address set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `addr`; returns whether it was new (adding an address already there changes
    /// nothing).
    pub fn insert(&self, addr: SocketAddr) -> bool {
        let mut pushed = self.inner.lock();
        if pushed.addresses.contains(&addr) {
            return false;
        }
        pushed.addresses.push(addr);
        pushed.publish();
        true
    }

    /// Removes `addr`, which then drains; returns whether it was there.
    pub fn remove(&self, addr: SocketAddr) -> bool {
        let mut pushed = self.inner.lock();
        let before = pushed.addresses.len();
        pushed.addresses.retain(|a| *a != addr);
        if pushed.addresses.len() == before {
            return false;
        }
        pushed.publish();
        true
    }

    /// Replaces the whole set (duplicates dropped): addresses not in `addresses` drain, new
    /// ones connect, the others keep their connections.
    pub fn replace(&self, addresses: impl IntoIterator<Item = SocketAddr>) {
        let mut seen = std::collections::HashSet::new();
        let unique: Vec<SocketAddr> = addresses
            .into_iter()
            .filter(|addr| seen.insert(*addr))
            .collect();
        let mut pushed = self.inner.lock();
        pushed.addresses = unique;
        pushed.publish();
    }

    /// The current set.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.inner.lock().addresses.clone()
    }

    /// A new pool follows this set: it gets the set as it is now (unless nothing was ever
    /// pushed), then every change. Under the lock, so that no change falls between the two.
    pub(crate) fn attach(&self, pool: Box<dyn AddressSink>) {
        let mut pushed = self.inner.lock();
        if pushed.changed && !pool.send(pushed.addresses.clone()) {
            return;
        }
        pushed.pools.push(pool);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A pool as the handle sees it: the sets it got, and whether it is still there.
    #[derive(Debug, Clone, Default)]
    struct Recorder {
        sets: Arc<Mutex<Vec<Vec<SocketAddr>>>>,
        gone: Arc<std::sync::atomic::AtomicBool>,
    }

    impl AddressSink for Recorder {
        fn send(&self, addresses: Vec<SocketAddr>) -> bool {
            if self.gone.load(std::sync::atomic::Ordering::Relaxed) {
                return false;
            }
            self.sets.lock().push(addresses);
            true
        }
    }

    /// Every change sends the whole set, in order; a no-op change sends nothing; a set made
    /// before the pool attached arrives whole at attach; a pool that is gone is dropped.
    #[test]
    fn changes_reach_attached_pools_as_whole_sets() {
        let push = Push::new();
        assert!(push.insert(sa("127.0.0.2:1")));
        let pool = Recorder::default();
        push.attach(Box::new(pool.clone()));
        assert!(!push.insert(sa("127.0.0.2:1")), "already there");
        assert!(push.insert(sa("127.0.0.3:1")));
        assert!(!push.remove(sa("127.0.0.9:1")), "never there");
        assert!(push.remove(sa("127.0.0.2:1")));
        push.replace([sa("127.0.0.4:1"), sa("127.0.0.4:1")]);
        assert_eq!(push.addresses(), vec![sa("127.0.0.4:1")]);
        assert_eq!(
            *pool.sets.lock(),
            vec![
                vec![sa("127.0.0.2:1")],
                vec![sa("127.0.0.2:1"), sa("127.0.0.3:1")],
                vec![sa("127.0.0.3:1")],
                vec![sa("127.0.0.4:1")],
            ]
        );
        pool.gone.store(true, std::sync::atomic::Ordering::Relaxed);
        push.insert(sa("127.0.0.5:1"));
        assert!(
            push.inner.lock().pools.is_empty(),
            "the closed pool is dropped"
        );
    }

    /// A pool attached to a handle nobody changed gets nothing (it waits for an address); one
    /// attached after an explicit `replace([])` gets the empty set.
    #[test]
    fn an_untouched_set_is_not_an_empty_one() {
        let untouched = Recorder::default();
        Push::new().attach(Box::new(untouched.clone()));
        assert!(untouched.sets.lock().is_empty());
        let emptied = Push::new();
        emptied.replace([]);
        let pool = Recorder::default();
        emptied.attach(Box::new(pool.clone()));
        assert_eq!(*pool.sets.lock(), vec![Vec::<SocketAddr>::new()]);
    }
}
