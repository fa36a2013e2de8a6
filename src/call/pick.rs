//! Picking a connection for a call, or waiting for one: the wait-for-ready table of the
//! module docs above, and the wait for room beside a full connection while its endpoint grows.

use crate::addr::EndpointAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::conn::{Connection, InFlightGuard};
use crate::error::Error;
use crate::growth::{self, Room, RoomSource};
use crate::registry::Shared;
use crate::state::ConnectivityState;

/// Waiting for room beside a full connection, as the call path sees the pool (the rule and
/// its wait live in [`crate::growth::make_room`]).
struct CallRoom<'a> {
    shared: &'a Shared,
    wait_for_ready: bool,
}

impl RoomSource for CallRoom<'_> {
    type Place = InFlightGuard;

    fn changes(&self) -> watch::Receiver<u64> {
        self.shared.subscribe_version()
    }

    fn room(&self) -> &Room {
        &self.shared.room
    }

    async fn pick(&self) -> Result<InFlightGuard, Error> {
        Ok(wait_for_connection(self.shared, self.wait_for_ready, None)
            .await?
            .start_call())
    }

    fn room_coming(&self, addr: &EndpointAddr) -> bool {
        self.shared.room_coming(addr)
    }

    fn request_growth(&self, addr: &EndpointAddr) {
        self.shared.request_growth(addr);
    }
}

/// Takes the call's place on a connection, or — when that connection is full and its endpoint
/// is growing — waits in the pool for a better one (see [`crate::growth::make_room`]).
pub(crate) async fn make_room(
    shared: &Shared,
    guard: InFlightGuard,
    wait_for_ready: bool,
) -> Result<InFlightGuard, Error> {
    growth::make_room(
        &CallRoom {
            shared,
            wait_for_ready,
        },
        guard,
    )
    .await
}

/// Waits until a connection can take the call, per the table in the module docs. A connection
/// with the id `avoid` is only taken when no other is Ready.
pub(crate) async fn wait_for_connection(
    shared: &Shared,
    wait_for_ready: bool,
    avoid: Option<u64>,
) -> Result<Arc<Connection>, Error> {
    let mut version = shared.subscribe_version();
    loop {
        // Mark the current version seen *before* looking, so that a change between the look
        // and the wait wakes the wait.
        version.borrow_and_update();
        if shared.is_shut_down() {
            return Err(Error::shutdown());
        }
        let (_, picker) = shared.load_picker();
        let pick = match avoid {
            None => picker.pick_reporting(&shared.cursor),
            Some(id) => picker.pick_avoiding(&shared.cursor, |conn| conn.id == id),
        };
        if let Some((conn, all_full)) = pick {
            if all_full {
                shared.request_growth(&conn.addr);
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
