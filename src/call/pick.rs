//! Picking a connection for a call, or waiting for one: the wait-for-ready table of the
//! module docs above, and the wait for room beside a full connection while its endpoint grows.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::conn::{InFlightGuard, ReadyConn};
use crate::error::Error;
use crate::registry::Shared;
use crate::state::ConnectivityState;

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
pub(crate) async fn make_room(
    shared: &Shared,
    guard: InFlightGuard,
    wait_for_ready: bool,
) -> Result<InFlightGuard, Error> {
    if !guard.is_beyond_stream_limit() {
        return Ok(guard);
    }
    let give_up = Instant::now() + MAX_ROOM_WAIT;
    // The place held from the last pick, given back only once the signals are subscribed.
    let mut held = Some(guard);
    loop {
        let mut version = shared.subscribe_version();
        version.borrow_and_update();
        let room = shared.room.waiter();
        if let Some(beyond) = held.take() {
            beyond.requeue();
        }
        let guard = wait_for_connection(shared, wait_for_ready, None)
            .await?
            .start_call();
        let addr = guard.conn().addr;
        if !guard.is_beyond_stream_limit() || Instant::now() >= give_up {
            return Ok(guard);
        }
        if !shared.room_coming(addr) {
            // No connection is coming. But the pick above may predate the state that says
            // so: the last connection growth may open can have become Ready (and calls can
            // have ended) between that pick and this look. One last pick, on a picker at
            // least as new as the state just read, finds such room; if there is none,
            // HTTP/2 queues the call on a full connection.
            guard.requeue();
            return Ok(wait_for_connection(shared, wait_for_ready, None)
                .await?
                .start_call());
        }
        shared.request_growth(addr);
        // The place is given back for the wait: others may take it meanwhile.
        guard.requeue();
        tokio::select! {
            _ = room => {}
            _ = version.changed() => {}
            _ = tokio::time::sleep_until(give_up) => {}
        }
    }
}

/// Waits until a connection can take the call, per the table in the module docs. A connection
/// with the id `avoid` is only taken when no other is Ready.
pub(crate) async fn wait_for_connection(
    shared: &Shared,
    wait_for_ready: bool,
    avoid: Option<u64>,
) -> Result<Arc<ReadyConn>, Error> {
    let mut version = shared.subscribe_version();
    loop {
        // Mark the current version seen *before* looking, so that a change between the look
        // and the wait wakes the wait.
        version.borrow_and_update();
        if shared.is_shut_down() {
            return Err(Error::shutdown());
        }
        let (_, picker) = shared.load_picker();
        let mut pick = picker.pick_reporting(&shared.cursor);
        // Walk on, at most once around the picker, past the connection to avoid.
        for _ in 1..picker.len() {
            match pick {
                Some((conn, _)) if Some(conn.id) == avoid => {
                    pick = picker.pick_reporting(&shared.cursor);
                }
                _ => break,
            }
        }
        if let Some((conn, all_full)) = pick {
            if all_full {
                shared.request_growth(conn.addr);
            }
            return Ok(conn.clone());
        }
        match shared.state() {
            ConnectivityState::Shutdown => return Err(Error::shutdown()),
            ConnectivityState::TransientFailure if !wait_for_ready => {
                let last = shared
                    .last_error()
                    .unwrap_or_else(|| "no connection".to_owned());
                return Err(Error::unavailable(format!(
                    "no ready connection (every connection in TRANSIENT_FAILURE); last error: {last}"
                )));
            }
            ConnectivityState::Idle => shared.request_connect(),
            _ => {}
        }
        if version.changed().await.is_err() {
            return Err(Error::shutdown());
        }
    }
}
