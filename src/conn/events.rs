//! What a slot tells the pool: the one interface through which a connection's state changes
//! travel up. Its own module so that the slot and the health Watch (which reports what the
//! server says as the connection's state) both depend on it, and not on each other.

use std::sync::Arc;

use crate::conn::Connection;
use crate::state::ConnectivityState;

/// What a slot tells the pool, which it knows only through this: its connection's state
/// changes (with the connection itself when Ready), its end, and a wish to resolve again. The
/// registry implements it, so that a change reaches the picker and the aggregate states in
/// the same step (a connection that went away leaves the picker before another call can
/// pick it). Like grpc-go's SubConn state listener: the slot names no layer above it.
pub(crate) trait SlotEvents: Send + Sync + 'static {
    /// The connection of slot `id` is now in state `to`; `ready` with it when Ready.
    fn transition(
        &self,
        id: u64,
        to: ConnectivityState,
        reason: &str,
        ready: Option<Arc<Connection>>,
    );
    /// Slot `id` has ended (after its last transition, to Shutdown).
    fn removed(&self, id: u64);
    /// A connection was lost or refused: resolve the target again soon.
    fn reresolve(&self);
}
