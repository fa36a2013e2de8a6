//! The integration tests: one crate, one module per concern, over the shared support in
//! `tests/support/` (real tonic servers on 127.0.0.x, a fault proxy, a DNS server, a
//! scriptable raw HTTP/2 server), so that support and generated code compile once.

#[path = "../support/mod.rs"]
mod support;

mod balance_policies;
mod discovery;
mod dns_resolver;
mod faults;
mod generated_clients;
mod goaway;
#[cfg(feature = "health")]
mod health;
mod hostile;
mod keepalive;
mod knobs;
mod observe;
mod outlier;
mod replacement;
mod resolution;
mod resolution_timing;
mod routing;
mod rpc_kinds;
mod shutdown;
mod states;
mod stream_limit;
mod streaming;
mod subset;
mod support_proxy;
mod support_smoke;
mod targets;
#[cfg(feature = "tls")]
mod tls;
mod tracing_spans;
#[cfg(feature = "tune")]
mod tune;
mod unix_targets;
mod wait_for_ready;
