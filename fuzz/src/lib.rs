//! Harnesses for the fuzz targets in `fuzz_targets/`, kept in a library so that
//! `cargo test` here replays the committed corpora and regressions through the very same
//! code (see `tests/replay.rs`) and the seed generator can encode inputs.
//!
//! Every harness runs a real [`tonic_pool::Pool`] on a current-thread runtime with a paused
//! clock: no sockets, no wall-clock waits; a hang shows up as a paused-time timeout.

pub mod hostile_server;
pub mod input;
pub mod pipe;
pub mod resolver_answers;
pub mod wire;

/// Whether `POOL_FUZZ_TRACE` is set: the harnesses then print what each call and step saw,
/// for reading a crash or checking what a seed exercises.
pub fn tracing() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("POOL_FUZZ_TRACE").is_some())
}

/// Builds the runtime every harness runs on: one thread, paused clock (auto-advancing
/// whenever every task is idle), so that minutes of deadlines and backoff cost no real time.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime")
}

#[cfg(test)]
mod replay;
#[cfg(test)]
mod seeds;
