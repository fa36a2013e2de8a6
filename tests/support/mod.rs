//! Shared test support for tonic-pool's integration tests, examples and benches.
//!
//! Use it from an integration test with `mod support;`, or from an example or
//! bench with `#[path = "../tests/support/mod.rs"] mod support;`. It is
//! self-contained: nothing here refers to `crate::` outside this directory.
//!
//! - [`echo`]: the generated `echo.Echo` client and server (see
//!   `proto/echo.proto`; regenerate with
//!   `cargo run --manifest-path tests/proto-gen/Cargo.toml`).
//! - [`server`]: [`server::TestServer`], a real echo server on its own thread
//!   and runtime, with connection and request counters.
//! - [`proxy`], [`dns`], [`fake_h2`]: the fault proxy, the DNS server and a raw
//!   HTTP/2 peer; [`hostile`]: a scriptable raw HTTP/2 server that can send
//!   anything; [`thread`]: the "own thread, own runtime, wait until it
//!   listens" start-up they share.

// Each test binary uses only part of this module, and its items are `pub` so
// that every binary can reach them.
#![allow(dead_code, unreachable_pub, unused_imports)]

/// Generated code for `tests/support/proto/echo.proto` (package `echo`).
pub mod echo {
    #![allow(missing_docs, missing_debug_implementations, clippy::all)]
    include!("proto/echo.rs");
}

pub mod dns;
pub mod proxy;
pub mod server;
pub mod thread;

pub use server::{loopback, ServerOptions, TestServer};
pub mod common;
pub mod fake_h2;
pub mod hostile;
