//! The integration tests: one crate, one module per concern, over the shared support in
//! `tests/support/` (real tonic servers on 127.0.0.x, a fault proxy, a DNS server, a
//! scriptable raw HTTP/2 server), so that support and generated code compile once.

#[path = "../support/mod.rs"]
mod support;

mod balance_policies;
mod dns_resolver;
mod faults;
mod goaway;
mod hostile;
mod keepalive;
mod replacement;
mod resolution;
mod resolution_timing;
mod routing;
mod rpc_kinds;
mod shutdown;
mod states;
mod stream_limit;
mod streaming;
mod support_proxy;
mod support_smoke;
mod targets;
mod wait_for_ready;
