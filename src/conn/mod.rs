//! One connection: its state machine, how it is opened, the task that drives it, and what
//! the pool reads off its bytes.
//!
//! Each connection *slot* runs as its own task, owned by the worker, and keeps one HTTP/2
//! connection to its address open: connect (with gRPC's backoff), serve, and on a GOAWAY, a
//! lost connection or a request to replace it, open the next while the old one's calls
//! finish. The pool drives h2's client directly rather than a tonic `Channel`: a `Channel`
//! hides its connection behind a `Buffer` and a `Reconnect` with no backoff that reports a
//! failed connection as ready, which would fight this state machine. Owning the connection
//! gives the pool exact facts — when the server's SETTINGS arrived, when a GOAWAY came, when
//! the connection is gone — and lets calls open their streams from their own task.
//!
//! | file | what it owns |
//! |---|---|
//! | `slot.rs` | the state machine (Idle → Connecting → Ready → …), backoff, retirement and wind-down |
//! | `events.rs` | `SlotEvents`: what a slot (and its health Watch) tells the pool |
//! | `connect.rs` | byte stream + HTTP/2 handshake with the pool's settings, until the server's SETTINGS |
//! | `driver.rs` | the task that does the connection's I/O, its PINGs (keepalive, BDP) and graceful close |
//! | `bdp.rs` | adaptive flow control: the bandwidth-delay estimate that grows the windows |
//! | `frames.rs` | the frame watcher: SETTINGS, GOAWAY, the stream ledger, the kill switch |
//! | `ready.rs` | a Ready connection as calls see it, and the in-flight guard a call holds |
//! | `health.rs` | (feature `health`) the server's health Watch on the connection (gRFC A17) |
//!
//! Two words, one meaning each: a **connection** ([`Connection`]) is one HTTP/2 connection that
//! reached Ready; its **slot** is the task that keeps one connection to an address open, across
//! reconnects (its id is the slot's, and the connection states of snapshots and events are the
//! slot's). A slot reports its states through [`SlotEvents`]; it names nothing above this
//! module.

pub(crate) mod bdp;
pub(crate) mod connect;
pub(crate) mod driver;
pub(crate) mod events;
pub(crate) mod frames;
#[cfg(feature = "health")]
pub(crate) mod health;
pub(crate) mod ready;
pub(crate) mod slot;

pub(crate) use events::SlotEvents;
pub(crate) use ready::{ConnStats, Connection, InFlight, InFlightGuard};
pub(crate) use slot::{Control, Slot};
