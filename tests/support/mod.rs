//! Shared test support for tonic-pool's integration tests, examples and benches.
//!
//! The integration tests (`tests/it/`) use all of it; an example or bench includes it with
//! `#[path = "../tests/support/mod.rs"] #[allow(dead_code)] mod support;` (each uses a part).
//! It is self-contained: nothing here refers to `crate::` outside this directory.
//!
//! - [`echo`]: the generated `echo.Echo` client and server (see
//!   `proto/echo.proto`; regenerate with
//!   `cargo run --manifest-path tests/proto-gen/Cargo.toml`).
//! - [`server`]: [`server::TestServer`], a real echo server on its own thread
//!   and runtime, with connection and request counters.
//! - [`proxy`], [`dns`], [`fake_h2`]: the fault proxy, the DNS server and a raw
//!   HTTP/2 peer; [`hostile`]: a scriptable raw HTTP/2 server that can send
//!   anything; [`thread`]: the "own thread, own runtime, wait until it
//!   listens" start-up they share; [`tls`]: certificates made at test time and
//!   TLS peers.

// Its items are `pub` so that the examples and benches that include this module by path can
// reach them too; within the test crate that is `pub` in a private module.
#![allow(unreachable_pub)]

/// Generated code for `tests/support/proto/echo.proto` (package `echo`).
pub mod echo {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    include!("proto/echo.rs");
}

pub mod dns;
pub mod proxy;
pub mod server;
pub mod thread;
// Used by the `tls` integration tests, which need the crate's `tls` feature.
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
pub mod tls;

pub use server::{loopback, ServerOptions, TestServer};
#[cfg(unix)]
pub use server::{UnixListen, UnixServer};
pub mod common;
pub mod fake_h2;
pub mod hostile;
